-- A run's claim on its message (relay/delivery/claims.py): the message's run record and
-- the lease of the run working on it, so that a message run twice is settled once.
--
-- KEYS[1]  relay:run:<message id>        HASH the run record: claimed, settled, d:<relay id>
-- KEYS[2]  relay:run:<message id>:lock   the lease: the holding run's token
-- KEYS[3]  relay:depth:ready             events ready in the queues
-- KEYS[4]  relay:depth:inflight          events taken by a run
-- KEYS[5]  relay:workers                 ZSET worker id -> lease deadline (relay/state/lease.py)
--
-- ARGV[1]  the run's token (<worker id>.<random hex>)
-- ARGV[2]  the claim's lease, in ms
-- ARGV[3]  the message's event count
-- ARGV[4]  the run record's TTL, in ms
--
-- Returns {0} settled (ack, do nothing), {1, pttl} busy (another run holds the lease for
-- pttl ms more), or {2, field...} claimed, with the run record's fields.

if redis.call('HEXISTS', KEYS[1], 'settled') == 1 then return {0} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  -- Our own lease: this is the same claim again (a client retrying after a lost reply).
  local holder = redis.call('GET', KEYS[2])
  if holder ~= ARGV[1] then
    -- Held by a run of another worker whose own lease lapsed (relay.state.lease): that
    -- run is gone, take over now rather than after the claim's TTL.
    local worker = holder and string.match(holder, '^(%x+)%.')
    local deadline = worker and worker ~= string.match(ARGV[1], '^(%x+)%.')
      and redis.call('ZSCORE', KEYS[5], worker)
    local t = redis.call('TIME')
    if not deadline or tonumber(deadline) >= tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 then
      return {1, redis.call('PTTL', KEYS[2])}
    end
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  end
end
-- 'claimed' holds a value longer than Redis keeps in a listpack (hash-max-listpack-value,
-- 64 bytes by default), so the record is a hash table from the start: each of the
-- hundreds of done marks a run writes is then one lookup, not a scan of those before it.
if redis.call('HSETNX', KEYS[1], 'claimed', '1' .. string.rep(' ', 64)) == 1 then
  -- Once per message. A publisher may count its message just after a worker took it,
  -- so the count can dip below zero for a moment; readers show at least zero.
  redis.call('DECRBY', KEYS[3], ARGV[3])
  redis.call('INCRBY', KEYS[4], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local out = redis.call('HKEYS', KEYS[1])
table.insert(out, 1, 2)
return out
