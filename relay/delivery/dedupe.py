"""Duplicate suppression by Segment `messageId`, within a window (default 24 h).

The first copy to reach a worker claims the messageId with its relay id. Another copy
(another relay id) within the window is a duplicate. The claiming copy itself, redelivered
after a worker crash, retried or replayed, keeps its relay id and so is never taken for
its own duplicate; a copy that ends in the dead-letter queue gives its claim back, so a
later resend is delivered. Nothing is claimed before it is safely queued. Once delivered,
the claim says so (in the settlement's MULTI): a copy of the same message that runs
later, after its run record expired, skips the event as a duplicate.

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

import functools
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
_NO_MESSAGE_ID = "\x00relay-id:"  # no messageId starts so (a control character)
# Redis's default hash-max-listpack-entries; 128 in the oldest configs, hence the fallback.
_LISTPACK_DEFAULT = 512
_LISTPACK_UNKNOWN = 128

# Helpers shared by the scripts. KEYS[1]: the bucket prefix. ARGV: now, window_s,
# bucket_s, (a script's own), then the events' digests (8 bytes each, in one string) and
# their tags (comma-separated, in the same order): two arguments however many events,
# not two per event for the client to encode. A bucket's meta HASH holds n (claims), l
# and p (its linear-hashing level and split pointer); shard i of bucket b is
# <prefix><b>:<i>.
# Fields are read and written a shard at a time (HMGET, HSET, HDEL of many fields), in
# chunks that stay under Lua's unpack limit.
_COMMON = """
local prefix = KEYS[1]
local now, window, span = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local current = math.floor(now / span)
local expire_at = (current + 1) * span + window + 1
local CHUNK = 1000
local buckets = {}
-- From one bucket ahead: a claim written by a worker whose clock is ahead of this one's
-- (by up to a bucket) is found too.
for b = current + 1, math.floor((now - window) / span), -1 do
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
-- fields -> {shard key -> list}, keys in first-seen order.
local function by_shard(bk, fields)
  local groups, order = {}, {}
  for _, f in ipairs(fields) do
    local key = shard(bk, hash(f))
    local g = groups[key]
    if not g then
      g = {}
      groups[key] = g
      order[#order + 1] = key
    end
    g[#g + 1] = f
  end
  return groups, order
end
-- The digests in ARGV[first] and the tags in ARGV[first + 1], as two lists.
local function events(first)
  local blob, fields, tags = ARGV[first], {}, {}
  for i = 1, #blob, 8 do fields[#fields + 1] = string.sub(blob, i, i + 7) end
  for tag in string.gmatch(ARGV[first + 1], '[^,]+') do tags[#tags + 1] = tag end
  return fields, tags
end
-- digest -> {value, bucket, shard key} of each claim held, the newest bucket's first.
local function lookup(fields)
  local found = {}
  for _, bk in ipairs(buckets) do
    local left = {}
    for _, f in ipairs(fields) do
      if not found[f] then left[#left + 1] = f end
    end
    local groups, order = by_shard(bk, left)
    for _, key in ipairs(order) do
      local g = groups[key]
      for s = 1, #g, CHUNK do
        local e = math.min(s + CHUNK - 1, #g)
        local vs = redis.call('HMGET', key, unpack(g, s, e))
        for j = s, e do
          local v = vs[j - s + 1]
          if v then found[g[j]] = {v, bk, key} end
        end
      end
    end
  end
  return found
end
-- HSET of field/value pairs, in chunks.
local function hset_all(key, pairs_)
  for s = 1, #pairs_, 2 * CHUNK do
    redis.call('HSET', key, unpack(pairs_, s, math.min(s + 2 * CHUNK - 1, #pairs_)))
  end
end
"""

# A claim's value once its event was delivered: its tag moved past every tag's range
# (tags are signed 24-bit), still an integer, so a listpack keeps it as compactly.
_SETTLED = 16777216
_SETTLED_LUA = f"local function settled(tag) return tostring(tonumber(tag) + {_SETTLED}) end\n"

# After _COMMON. ARGV[4]: the target claims per shard. Returns one flag per event:
# 1 = another copy's claim, 2 = this copy's, its event delivered already. The bucket
# splits for all of this call's new claims first, then each goes straight to its shard:
# the same layout as claiming and splitting one at a time.
_CLAIM = """
local fill = tonumber(ARGV[4])
local cur = nil
for _, bk in ipairs(buckets) do
  if bk.b == current then cur = bk end
end
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
local fields, tags = events(5)
local found = lookup(fields)
local out, mine, new = {}, {}, {}
for i, f in ipairs(fields) do
  local tag = tags[i]
  local held = found[f] and found[f][1] or mine[f]
  if held == tag then
    out[#out + 1] = 0
  elseif held and held == settled(tag) then
    out[#out + 1] = 2
  elseif held then
    out[#out + 1] = 1
  else
    mine[f] = tag
    new[#new + 1] = f
    out[#out + 1] = 0
  end
end
if #new > 0 then
  if not cur then
    cur = {b = current, l = 0, p = 0, n = 0}
    table.insert(buckets, 1, cur)
  end
  cur.n = cur.n + #new
  while cur.n > fill * (2 ^ cur.l + cur.p) do split() end
  local groups, order = by_shard(cur, new)
  for _, key in ipairs(order) do
    local pairs_ = {}
    for _, f in ipairs(groups[key]) do
      pairs_[#pairs_ + 1] = f
      pairs_[#pairs_ + 1] = mine[f]
    end
    hset_all(key, pairs_)
    touched[key] = true
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
local fields, tags = events(4)
local found = lookup(fields)
local groups, order, gone = {}, {}, {}
for i, f in ipairs(fields) do
  local tag = tags[i]
  local hit = found[f]
  if hit and hit[1] == tag and not gone[f] then
    gone[f] = true
    local key = hit[3]
    if not groups[key] then
      groups[key] = {}
      order[#order + 1] = {key, hit[2]}
    end
    table.insert(groups[key], f)
  end
end
for _, kb in ipairs(order) do
  local key, g, removed = kb[1], groups[kb[1]], 0
  for s = 1, #g, CHUNK do
    removed = removed + redis.call('HDEL', key, unpack(g, s, math.min(s + CHUNK - 1, #g)))
  end
  redis.call('HINCRBY', prefix .. kb[2].b, 'n', -removed)
end
return 0
"""


# After _COMMON. Marks each claim still held by the given tag delivered (`settled`).
_DELIVERED = """
local fields, tags = events(4)
local found = lookup(fields)
local groups, order = {}, {}
for i, f in ipairs(fields) do
  local tag = tags[i]
  local hit = found[f]
  if hit and hit[1] == tag then
    local key = hit[3]
    if not groups[key] then
      groups[key] = {}
      order[#order + 1] = key
    end
    local g = groups[key]
    g[#g + 1] = f
    g[#g + 1] = settled(tag)
  end
end
for _, key in ipairs(order) do hset_all(key, groups[key]) end
return 0
"""

# After _COMMON. Read only (preview, dry runs): one flag per event, 1 = another copy holds it.
_PEEK = """
local fields, tags = events(4)
local found = lookup(fields)
local out = {}
for i, f in ipairs(fields) do
  local hit = found[f]
  out[#out + 1] = (hit and hit[1] ~= tags[i]) and 1 or 0
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
        self._claim = r.register_script(header + _COMMON + _SETTLED_LUA + _CLAIM)
        self._release = r.register_script(header + _COMMON + _RELEASE)
        self._delivered = r.register_script(header + _COMMON + _SETTLED_LUA + _DELIVERED)
        self._peek = r.register_script(_COMMON + _PEEK)

    def duplicates(self, items: list[Envelope]) -> set[str]:
        """Relay ids of items whose messageId another copy already claimed, or whose own
        claim says they were delivered (a copy of a message that was settled, run after
        its run record expired: relay.delivery.claims)."""
        pairs = _pairs(items)
        if not pairs or self._window <= 0:
            return set()
        flags = self._claim(keys=[keys.DEDUPE], args=self._args(pairs, self._fill))
        return {rid for (_, _, rid), dup in zip(pairs, flags, strict=True) if int(dup)}

    def stage_delivered(self, pipe: Any, items: list[Envelope]) -> None:
        """Queue on the settlement's MULTI: these items' claims say they were delivered,
        for the rest of the window."""
        pairs = _pairs(items)
        if not pairs or self._window <= 0:
            return
        self._delivered(keys=[keys.DEDUPE], args=self._args(pairs), client=pipe)

    def peek(self, items: list[Envelope]) -> set[str]:
        """What `duplicates` would say now, claiming nothing (a preview, a dry run)."""
        pairs = _pairs(items)
        if not pairs or self._window <= 0:
            return set()
        flags = self._peek(keys=[keys.DEDUPE], args=self._args(pairs))
        return {rid for (_, _, rid), dup in zip(pairs, flags, strict=True) if int(dup)}

    def release(self, items: list[Envelope]) -> None:
        """Give back the claims of items that were not delivered."""
        pairs = _pairs(items)
        if not pairs or self._window <= 0:
            return
        self._release(keys=[keys.DEDUPE], args=self._args(pairs))

    def _args(self, pairs: list[tuple[bytes, str, str]], *more: Any) -> list[Any]:
        # Every script's arguments: the clock, the window, the bucket span (then `more`),
        # the digests and the tags (see _COMMON).
        digests = b"".join(digest for digest, _, _ in pairs)
        tags = ",".join(tag for _, tag, _ in pairs)
        return [self._clock(), self._window, self._span, *more, digests, tags]


def message_digest(message_id: str) -> bytes:
    """The 8-byte digest a messageId is stored as (64 bits: docs/sizing.md has the odds)."""
    return hashlib.blake2b(message_id.encode(), digest_size=8).digest()


def relay_tag(rid: str) -> str:
    """The 24-bit tag of a relay id, as the decimal string Redis stores compactly."""
    tag = hashlib.blake2b(rid.encode(), digest_size=3).digest()
    return str(int.from_bytes(tag, "big", signed=True))


def _pairs(items: list[Envelope]) -> list[tuple[bytes, str, str]]:
    return [(*_pair(item.message_id, item.id), item.id) for item in items]


# A run claims its events, then marks them delivered or releases them: the same pairs,
# hashed once. Bounded: a few messages' events per worker thread.
@functools.lru_cache(maxsize=4096)
def _pair(message_id: str | None, rid: str) -> tuple[bytes, str]:
    # An event without a messageId is claimed under its relay id: no other copy can be
    # recognised, but a later copy of its own message finds it delivered.
    return message_digest(message_id or _NO_MESSAGE_ID + rid), relay_tag(rid)


def _listpack_entries(r: Any) -> int:
    try:
        found = r.config_get("hash-max-listpack-entries")
        return int(found.get("hash-max-listpack-entries") or _LISTPACK_DEFAULT)
    except (redis.ResponseError, ValueError):
        return _LISTPACK_UNKNOWN  # CONFIG renamed or off (managed Redis): assume the least
