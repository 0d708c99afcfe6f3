"""Duplicate suppression by Segment `messageId`, within a window (default 24 h).

The first copy to reach a worker claims the messageId with its relay id. Another copy
(another relay id) within the window is a duplicate. The claiming copy itself, redelivered
after a worker crash, retried or replayed, keeps its relay id and so is never taken for
its own duplicate; a copy that ends in the dead-letter queue gives its claim back, so a
later resend is delivered. Nothing is claimed before it is safely queued.
"""

from __future__ import annotations

from typing import Any

from relay import keys

# KEYS: claim keys. ARGV: window_s, then one relay id per key. Returns 1 per duplicate.
_CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  local rid = ARGV[i + 1]
  if redis.call('SET', key, rid, 'NX', 'EX', ARGV[1]) then
    out[i] = 0
  elseif redis.call('GET', key) == rid then
    out[i] = 0
  else
    out[i] = 1
  end
end
return out
"""

# KEYS: claim keys. ARGV: relay ids. Deletes each claim still held by that id.
_RELEASE = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then redis.call('DEL', key) end
end
return 0
"""


class Dedupe:
    """Claims and releases messageIds (sync Redis client)."""

    def __init__(self, r: Any, window_s: int) -> None:
        self._window = window_s
        self._claim = r.register_script(_CLAIM)
        self._release = r.register_script(_RELEASE)

    def duplicates(self, items: list[dict[str, Any]]) -> set[str]:
        """Relay ids of items whose messageId another copy already claimed."""
        pairs = _pairs(items)
        if not pairs or self._window <= 0:
            return set()
        flags = self._claim(keys=[k for k, _ in pairs], args=[self._window, *(r for _, r in pairs)])
        return {rid for (_, rid), dup in zip(pairs, flags, strict=True) if int(dup)}

    def release(self, items: list[dict[str, Any]]) -> None:
        """Give back the claims of items that were not delivered."""
        pairs = _pairs(items)
        if pairs and self._window > 0:
            self._release(keys=[k for k, _ in pairs], args=[r for _, r in pairs])


def _pairs(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        event = item.get("event")
        message_id = event.get("messageId") if isinstance(event, dict) else None
        if isinstance(message_id, str) and message_id:
            pairs.append((keys.dedupe(message_id), str(item["id"])))
    return pairs
