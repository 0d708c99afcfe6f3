-- Merges what a batch learned into the identity map (relay/state/identity.py), as
-- Known.merged does: an account from an older call than the stored one's (both times
-- known) is not taken; a stored contact is replaced only from a firm source
-- (contactExternalId, import).
--
-- KEYS[1...]  relay:identity:<user key>    STRING JSON [account, contact, at, source]
--
-- ARGV[1]  the entries' TTL, in seconds
-- then per entry i, ARGV[4i-2 .. 4i+1]: its account, contact, the account's event time in
--          ms and the contact's source ("" for each: unknown, keep the old)
--
-- Returns the number of entries written.

local function json(s) if s == '' then return 'null' end return cjson.encode(s) end
for i, key in ipairs(KEYS) do
  local a, c, at, src = ARGV[4 * i - 2], ARGV[4 * i - 1], ARGV[4 * i], ARGV[4 * i + 1]
  local old = redis.call('GET', key)
  if old then
    local v = cjson.decode(old)
    local old_at = v[3]
    if type(old_at) ~= 'number' then old_at = nil end
    local older = at ~= '' and old_at ~= nil and tonumber(at) < old_at
    if (a == '' or older) and type(v[1]) == 'string' then
      a = v[1]
      at = old_at and string.format('%d', old_at) or ''
    end
    local firm = src == 'contactExternalId' or src == 'import'
    if type(v[2]) == 'string' and (c == '' or not firm) then
      c = v[2]
      src = type(v[4]) == 'string' and v[4] or ''
    end
  end
  local stamp = 'null'
  if at ~= '' then stamp = at end
  redis.call('SET', key, '[' .. json(a) .. ',' .. json(c) .. ',' .. stamp .. ',' .. json(src)
    .. ']', 'EX', ARGV[1])
end
return #KEYS
