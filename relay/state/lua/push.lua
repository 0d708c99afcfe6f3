-- Messages onto a queue with the counts that move with them (relay/state/broker.py). One
-- command, so one round trip and one reply to parse (a MULTI pipeline of the same writes
-- has a reply per command), and atomic like MULTI: the counts move with the messages or
-- not at all.
--
-- KEYS[1]  the queue (relay or relay.replay)       LIST, kombu pushes left, workers pop right
-- KEYS[2]  relay:depth:ready                       events ready in the queues
-- KEYS[3]  ARGV[2] = 'rate': this second's ingested-event count (state/status.py rate_key);
--          ARGV[2] = 'move': relay:delayed, the delayed set
-- KEYS[4]  'move': relay:depth:delayed, the delayed set's event count
-- KEYS[5]  'move': relay:delayed:received:<state>, the index of its members' oldest receipts
--
-- ARGV[1]  the messages' event count
-- ARGV[2]  'rate' (ingest), 'move' (the delayed-set mover) or '' (anything else)
-- ARGV[3]  'rate': that count's TTL in seconds; 'move': the delayed-set member; else ''
-- ARGV[4]  'move': the member's id in the index; otherwise the first message
-- ARGV[5...] the messages (from ARGV[4] unless 'move')
--
-- Returns 1, or 0 for a 'move' whose member is gone (another mover published it).

local first = 4
if ARGV[2] == 'move' then
  -- Gone: another mover claimed it after this one's lease ran out, and published it.
  if redis.call('ZREM', KEYS[3], ARGV[3]) == 0 then return 0 end
  redis.call('DECRBY', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[4])
  first = 5
end
for i = first, #ARGV do redis.call('LPUSH', KEYS[1], ARGV[i]) end
redis.call('INCRBY', KEYS[2], ARGV[1])
if ARGV[2] == 'rate' then
  redis.call('INCRBY', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return 1
