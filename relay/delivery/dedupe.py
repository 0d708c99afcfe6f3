"""Duplicate suppression by Segment `messageId`, within a window (default 24 h).

The first copy to reach a worker claims the messageId with its relay id. Another copy
(another relay id) within the window is a duplicate. The claiming copy itself, redelivered
after a worker crash, retried or replayed, keeps its relay id and so is never taken for
its own duplicate; a copy that ends in the dead-letter queue gives its claim back, so a
later resend is delivered. Nothing is claimed before it is safely queued.

Storage is compact and bounded (a key per messageId carries Redis's per-key overhead for
every event; figures in docs/sizing.md). Claims go into time buckets of 1/24 of the window; a
bucket expires once it no longer overlaps the window, so memory holds at most
window + one bucket of claims. A bucket is a set of small HASHes that Redis keeps
listpack-encoded: field = 8-byte digest of the messageId, value = a 24-bit tag of the
relay id (an integer, 5 bytes in a listpack). The bucket grows its shards by
linear hashing (one shard split at a time, as claims arrive), so each shard stays far
under `hash-max-listpack-entries` at any event rate, with no sizing setting.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

import redis

from relay import keys
from relay.envelope import Envelope
from relay.state import oom

BUCKETS_PER_WINDOW = 24
# Redis's default hash-max-listpack-entries; 128 in the oldest configs, hence the fallback.
_LISTPACK_DEFAULT = 512
_LISTPACK_UNKNOWN = 128

# Helpers shared by both scripts. KEYS[1]: the bucket prefix. ARGV: now, window_s,
# bucket_s, then pairs (digest, tag). A bucket's meta HASH holds n (claims), l and p (its
# linear-hashing level and split pointer); shard i of bucket b is <prefix><b>:<i>.
_COMMON = """
local prefix = KEYS[1]
local now, window, span = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local current = math.floor(now / span)
local expire_at = (current + 1) * span + window + 1
local buckets = {}
for b = current, math.floor((now - window) / span), -1 do
  local m = redis.call('HMGET', prefix .. b, 'l', 'p', 'n')
  if m[1] then
    buckets[#buckets + 1] = {b = b, l = tonumber(m[1]), p = tonumber(m[2]),
                             n = tonumber(m[3] or 0)}
  end
end
local function hash(f)
  local a, b, c, d = string.byte(f, 1, 4)
  return ((a * 256 + b) * 256 + c) * 256 + d
end
local function shard(bk, h)
  local s = h % (2 ^ bk.l)
  if s < bk.p then s = h % (2 ^ (bk.l + 1)) end
  return prefix .. bk.b .. ':' .. string.format('%d', s)
end
local function find(f, h)
  for _, bk in ipairs(buckets) do
    local key = shard(bk, h)
    local v = redis.call('HGET', key, f)
    if v then return v, bk, key end
  end
  return nil
end
"""

# After _COMMON. ARGV[4]: the target claims per shard. Returns one flag per pair: 1 = duplicate.
_CLAIM = """
local fill = tonumber(ARGV[4])
local cur = buckets[1]
if not (cur and cur.b == current) then cur = nil end
local touched = {}
local function split()
  local src = prefix .. current .. ':' .. string.format('%d', cur.p)
  local dst = prefix .. current .. ':' .. string.format('%d', cur.p + 2 ^ cur.l)
  local entries = redis.call('HGETALL', src)
  local moved, fields = {}, {}
  for j = 1, #entries, 2 do
    if hash(entries[j]) % (2 ^ (cur.l + 1)) ~= cur.p then
      moved[#moved + 1] = entries[j]
      moved[#moved + 1] = entries[j + 1]
      fields[#fields + 1] = entries[j]
    end
  end
  if #fields > 0 then
    redis.call('HSET', dst, unpack(moved))
    redis.call('HDEL', src, unpack(fields))
    touched[dst] = true
  end
  cur.p = cur.p + 1
  if cur.p == 2 ^ cur.l then cur.l, cur.p = cur.l + 1, 0 end
end
local out = {}
for i = 5, #ARGV, 2 do
  local f, tag = ARGV[i], ARGV[i + 1]
  local h = hash(f)
  local found = find(f, h)
  if found then
    out[#out + 1] = (found == tag) and 0 or 1
  else
    if not cur then
      cur = {b = current, l = 0, p = 0, n = 0}
      table.insert(buckets, 1, cur)
    end
    local key = shard(cur, h)
    redis.call('HSET', key, f, tag)
    touched[key] = true
    cur.n = cur.n + 1
    while cur.n > fill * (2 ^ cur.l + cur.p) do split() end
    out[#out + 1] = 0
  end
end
if cur then
  local meta = prefix .. current
  redis.call('HSET', meta, 'l', cur.l, 'p', cur.p, 'n', cur.n)
  redis.call('EXPIREAT', meta, expire_at)
  for key in pairs(touched) do redis.call('EXPIREAT', key, expire_at) end
end
return out
"""

# After _COMMON. Deletes each claim still held by the given tag.
_RELEASE = """
for i = 4, #ARGV, 2 do
  local f, tag = ARGV[i], ARGV[i + 1]
  local found, bk, key = find(f, hash(f))
  if found == tag then
    redis.call('HDEL', key, f)
    redis.call('HINCRBY', prefix .. bk.b, 'n', -1)
  end
end
return 0
"""


# After _COMMON. Read only (preview, dry runs): one flag per pair, 1 = another copy holds it.
_PEEK = """
local out = {}
for i = 4, #ARGV, 2 do
  local found = find(ARGV[i], hash(ARGV[i]))
  out[#out + 1] = (found and found ~= ARGV[i + 1]) and 1 or 0
end
return out
"""


class Dedupe:
    """Claims and releases messageIds (sync Redis client)."""

    def __init__(self, r: Any, window_s: int, *, clock: Callable[[], float] = time.time) -> None:
        self._window = window_s
        self._span = max(math.ceil(window_s / BUCKETS_PER_WINDOW), 1)
        self._clock = clock
        self._fill = 1
        header = ""
        if window_s > 0:
            self._fill = max(_listpack_entries(r) // 4, 1)
            # A worker draining a full Redis must still record claims (a few bytes per
            # event, far less than the acked message that carried it frees): relay.state.oom.
            header = oom.header(r)
        self._claim = r.register_script(header + _COMMON + _CLAIM)
        self._release = r.register_script(header + _COMMON + _RELEASE)
        self._peek = r.register_script(_COMMON + _PEEK)

    def duplicates(self, items: list[Envelope]) -> set[str]:
        """Relay ids of items whose messageId another copy already claimed."""
        pairs = _pairs(items)
        if not pairs or self._window <= 0:
            return set()
        args: list[Any] = [self._clock(), self._window, self._span, self._fill]
        for digest, tag, _ in pairs:
            args += [digest, tag]
        flags = self._claim(keys=[keys.DEDUPE], args=args)
        return {rid for (_, _, rid), dup in zip(pairs, flags, strict=True) if int(dup)}

    def peek(self, items: list[Envelope]) -> set[str]:
        """What `duplicates` would say now, claiming nothing (a preview, a dry run)."""
        pairs = _pairs(items)
        if not pairs or self._window <= 0:
            return set()
        args: list[Any] = [self._clock(), self._window, self._span]
        for digest, tag, _ in pairs:
            args += [digest, tag]
        flags = self._peek(keys=[keys.DEDUPE], args=args)
        return {rid for (_, _, rid), dup in zip(pairs, flags, strict=True) if int(dup)}

    def release(self, items: list[Envelope]) -> None:
        """Give back the claims of items that were not delivered."""
        pairs = _pairs(items)
        if not pairs or self._window <= 0:
            return
        args: list[Any] = [self._clock(), self._window, self._span]
        for digest, tag, _ in pairs:
            args += [digest, tag]
        self._release(keys=[keys.DEDUPE], args=args)


def message_digest(message_id: str) -> bytes:
    """The 8-byte digest a messageId is stored as (64 bits: docs/sizing.md has the odds)."""
    return hashlib.blake2b(message_id.encode(), digest_size=8).digest()


def relay_tag(rid: str) -> str:
    """The 24-bit tag of a relay id, as the decimal string Redis stores compactly."""
    tag = hashlib.blake2b(rid.encode(), digest_size=3).digest()
    return str(int.from_bytes(tag, "big", signed=True))


def _pairs(items: list[Envelope]) -> list[tuple[bytes, str, str]]:
    return [
        (message_digest(item.message_id), relay_tag(item.id), item.id)
        for item in items
        if item.message_id is not None
    ]


def _listpack_entries(r: Any) -> int:
    try:
        found = r.config_get("hash-max-listpack-entries")
        return int(found.get("hash-max-listpack-entries") or _LISTPACK_DEFAULT)
    except (redis.ResponseError, ValueError):
        return _LISTPACK_UNKNOWN  # CONFIG renamed or off (managed Redis): assume the least
