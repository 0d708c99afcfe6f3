-- A pipeline's staged commands and scripts, run as one script (relay/state/oom.py), which
-- Redis accepts at maxmemory where it refuses a MULTI: atomic as the MULTI it replaces
-- (and, like MULTI, not rolled back if a command fails). Each staged script is a function
-- of its own KEYS and ARGV, SCRIPTS[n], defined before this text (a script cannot call
-- another script, but it can hold its text).
--
-- KEYS     none
--
-- ARGV     the staged steps, in order, each one of:
--          a command: its argument count n > 0, then its n arguments (name first);
--          a script: 0, the script's number in SCRIPTS, its key count k, the count m of
--          its keys and arguments together, then its k keys and m - k arguments.
--
-- Returns 0.

local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if n > 0 then
    redis.call(unpack(ARGV, i + 1, i + n))
    i = i + n + 1
  else
    local f, k, m = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    local first, keys, argv = i + 4, {}, {}
    for j = 1, k do keys[j] = ARGV[first + j - 1] end
    for j = 1, m - k do argv[j] = ARGV[first + k + j - 1] end
    SCRIPTS[f](keys, argv)
    i = first + m
  end
end
return 0
