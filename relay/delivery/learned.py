"""The learned rate (AIMD): what ChurnZero takes, found from its 429s.

Invariant: the learned rate stays between `ADAPT_MIN_RPS` and the explicit
`rate_limit_rps` (when one is set); requests on the wire together are one signal, so it is
cut at most once per two seconds. A 429 cuts it, success slowly raises it.
"""

from __future__ import annotations

from typing import Any

from relay import keys

# KEYS: adaptive state (HASH: rate, phase, cut_at, grown_at, and the 2xx counts of the
# last four seconds as ok<n>/at<n>, n = second mod 4). ARGV: successes, throttled,
# cap_rps (0: none), beta, alpha (rps per s), min_rps, first_rps, slow_start (x per s),
# first beta (the cut that ends slow start).
# The rate starts at the cap, or first_rps, and grows by slow_start per second of success
# until the first 429; from then on (AIMD) a 429 cuts it to beta x the 2xx rate of the
# last two seconds (at most once per 2 s: requests on the wire together are one
# signal), and success adds alpha per second. Returns the rate before.
_ADAPT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local sec = tonumber(t[1])
local ok, throttled, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local st = redis.call('HMGET', KEYS[1], 'rate', 'phase', 'cut_at', 'grown_at')
local rate = tonumber(st[1] or '0')
if rate <= 0 then
  rate = cap > 0 and cap or tonumber(ARGV[7])
  st[2] = cap > 0 and 'avoid' or 'slow'
  st[4] = tostring(now)
end
local cut_at, grown_at = tonumber(st[3] or '0'), tonumber(st[4] or '0')
local slot = sec % 4
if ok > 0 then
  if tonumber(redis.call('HGET', KEYS[1], 'at' .. slot) or '0') ~= sec then
    redis.call('HSET', KEYS[1], 'at' .. slot, sec, 'ok' .. slot, 0)
  end
  redis.call('HINCRBY', KEYS[1], 'ok' .. slot, ok)
end
local new, phase = rate, st[2] or 'slow'
if throttled > 0 then
  if now - cut_at >= 2000 then
    local seen = 0
    for back = 1, 2 do
      local s = (sec - back) % 4
      if tonumber(redis.call('HGET', KEYS[1], 'at' .. s) or '0') == sec - back then
        seen = seen + tonumber(redis.call('HGET', KEYS[1], 'ok' .. s) or '0')
      end
    end
    -- What ChurnZero accepted lately (2xx per second over two seconds: reports arrive in
    -- bursts), or the rate itself if lower.
    local base = rate
    if seen > 0 and seen / 2 < rate then base = seen / 2 end
    -- Leaving slow start, the 2xx count still holds the burst ChurnZero's bucket let
    -- through: cut deeper once (ARGV[9]) so the first cut lands under the limit.
    local beta = phase == 'slow' and tonumber(ARGV[9]) or tonumber(ARGV[4])
    new = math.max(tonumber(ARGV[6]), beta * base)
    phase, cut_at, grown_at = 'avoid', now, now
  end
elseif ok > 0 then
  -- At most a second's growth per report: an idle spell is no evidence of room.
  local dt = math.min(math.max(now - grown_at, 0) / 1000, 1)
  if phase == 'slow' then
    new = math.min(rate * tonumber(ARGV[8]) ^ dt, 10000)
  else
    new = rate + tonumber(ARGV[5]) * dt
  end
  grown_at = now
end
if cap > 0 and new > cap then new = cap end
redis.call('HSET', KEYS[1], 'rate', tostring(new), 'phase', phase, 'cut_at', cut_at,
           'grown_at', grown_at)
redis.call('EXPIRE', KEYS[1], 86400)
return tostring(rate)
"""

# The self-tuning rate: a first guess of 20 requests/s growing 1.5x a second until the
# first 429 (slow start, as TCP); then a cut keeps 90 % and the rate grows back by 0.5
# requests/s per second, so near a hidden limit of 50/s a cycle lasts some 20 s.
ADAPT_FIRST_RPS = 20.0
ADAPT_SLOW_START = 1.5
ADAPT_BETA = 0.9
ADAPT_FIRST_BETA = 0.75
ADAPT_ALPHA_RPS = 0.5
ADAPT_MIN_RPS = 1.0
ADAPT_MAX_RPS = 10_000.0  # where slow start stops growing without a cap (_ADAPT's 10000)
# A 429 with a Retry-After up to this long (or none) is a rate signal: it cuts the
# learned rate instead of pausing every worker. Longer ones pause, and cut nothing.
ADAPT_PAUSE_BELOW_S = 1.0
# While the rate is being learned (no explicit rate), a task reserves slots at most this
# far ahead, so a cut takes hold within about a second instead of after a task's backlog.
ADAPT_MAX_WAIT_S = 1.0


class LearnedRate:
    """The deployment's learned rate, moved by request outcomes (sync Redis client)."""

    def __init__(self, r: Any, allow_oom: str, *, cap_rps: float) -> None:
        self._cap = cap_rps
        self._adapt = r.register_script(allow_oom + _ADAPT)

    @staticmethod
    def is_signal(throttled: int, retry_after_s: float | None) -> bool:
        """Whether 429s are a rate signal (cut the rate) rather than a pause."""
        return bool(throttled) and (retry_after_s or 0) <= ADAPT_PAUSE_BELOW_S

    def report(self, *, successes: int, throttled: int) -> None:
        """Grow the rate by `successes`, or cut it for `throttled` 429s."""
        self._adapt(
            keys=[keys.ADAPTIVE_RATE],
            args=[successes, throttled, self._cap, ADAPT_BETA, ADAPT_ALPHA_RPS,
                  ADAPT_MIN_RPS, ADAPT_FIRST_RPS, ADAPT_SLOW_START, ADAPT_FIRST_BETA],
        )  # fmt: skip
