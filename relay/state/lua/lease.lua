-- The workers' leases (relay/state/lease.py): one script, a command per call, as
-- dramatiq's dispatch.lua. Keys of other workers are built here from the ids found: the
-- relay runs on one Redis (a primary and its replicas), never on a cluster.
--
-- KEYS[1]  relay:workers           ZSET worker id -> lease deadline (ms on Redis's clock)
-- KEYS[2]  relay:workers:beat      when any worker last reached Redis (ms)
-- KEYS[3]  enlist: the caller's taken list; sweep: kombu's unacked index
-- KEYS[4]  enlist: the caller's held set
--
-- ARGV[1]  the command: beat | enlist | sweep
-- ARGV[2]  the lease, in ms
-- ARGV[3]  the caller's worker id (a sweep never sweeps its own)
-- ARGV[4]  enlist, sweep: the queue of a taken message whose routing key is unreadable
-- ARGV[5]  sweep: the prefix of a worker's keys (relay:worker:)
-- ARGV[6]  sweep: the suffix of a worker's taken list (:taken)
-- ARGV[7]  sweep: the suffix of a worker's held set (:held)
-- ARGV[8]  sweep: kombu's visibility timeout, in seconds
-- ARGV[9]  sweep: the most unacked messages past it to return
-- ARGV[10] sweep: how long a lapsed worker stays registered, in ms
--
-- beat    renews the caller's lease; returns 0 renewed, 1 it had lapsed, 2 it was new.
-- enlist  renews it, puts the caller's taken list back on the queues, and returns the
--         delivery tags of its held set (the caller restores them).
-- sweep   puts back the taken lists of lapsed workers and returns the delivery tags to
--         restore: those of their held sets, and unacked ones past the visibility timeout.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])

-- Silence: nobody reached Redis for longer than a lease (Redis was down or restarted, or
-- every worker was cut off), so nobody could renew. Every lease live when it began gets a
-- fresh one: an outage alone never makes a live worker look dead.
local last = tonumber(redis.call('GET', KEYS[2]))
if last and now - last > lease then
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], last, '+inf')) do
    redis.call('ZADD', KEYS[1], now + lease, w)
  end
end
redis.call('SET', KEYS[2], now)

-- Every message of a taken list back at the head of its queue (its routing key, as kombu's
-- restore does), oldest first.
local function put_back(taken, fallback)
  while true do
    local m = redis.call('LPOP', taken)
    if not m then return end
    local queue = fallback
    local ok, p = pcall(cjson.decode, m)
    if ok and type(p) == 'table' and type(p.properties) == 'table' then
      local d = p.properties.delivery_info
      if type(d) == 'table' and type(d.routing_key) == 'string' and d.routing_key ~= '' then
        queue = d.routing_key
      end
    end
    redis.call('RPUSH', queue, m)
  end
end

local command = ARGV[1]
if command == 'beat' then
  local d = redis.call('ZSCORE', KEYS[1], ARGV[3])
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  if not d then return 2 end
  if tonumber(d) < now then return 1 end
  return 0
elseif command == 'enlist' then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  put_back(KEYS[3], ARGV[4])
  return redis.call('SMEMBERS', KEYS[4])
elseif command == 'sweep' then
  local forget = tonumber(ARGV[10])
  local out = {}
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now - forget, '(' .. now)) do
    if w ~= ARGV[3] then
      put_back(ARGV[5] .. w .. ARGV[6], ARGV[4])
      local held = ARGV[5] .. w .. ARGV[7]
      for _, tag in ipairs(redis.call('SMEMBERS', held)) do table.insert(out, tag) end
      redis.call('DEL', held)
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - forget)
  local ceil = now / 1000 - tonumber(ARGV[8])
  for _, tag in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ceil, 'LIMIT', 0, ARGV[9])) do
    table.insert(out, tag)
  end
  return out
end
return redis.error_reply('unknown lease command ' .. tostring(command))
