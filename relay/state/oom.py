"""Worker writes that Redis accepts at maxmemory (scripts flagged `allow-oom`, Redis 7+).

At `maxmemory` with `noeviction` Redis refuses every command that may grow memory, and
every command queued in a MULTI, even a read. A worker's writes only move work already in
Redis (queue to delayed set or dead letters) or are a few bytes of bookkeeping, while each
message it acknowledges frees its whole body, so they are let through; ingest's are not
(its gate stops it first). On servers before 7 everything runs as usual.
"""

from __future__ import annotations

import weakref
from typing import Any

ALLOW_OOM = "#!lua flags=allow-oom\n"

# ARGV: for each command its argument count, then its arguments. One script: atomic, as
# the MULTI it replaces (and, like MULTI, not rolled back if a command fails).
_RUN = (
    ALLOW_OOM
    + """
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 0
"""
)


_SCRIPT_COMMANDS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})


# Asked once per client: the scripts of a client's users carry the header they chose at
# start (`header`) anyway, and an INFO per settlement was a round trip per write.
_FLAGS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def script_flags(r: Any) -> bool:
    """Whether the server knows script flags (Redis 7+); asked once per client."""
    flags = _FLAGS.get(r)
    if flags is None:
        flags = _FLAGS[r] = int(str(r.info("server").get("redis_version", "0")).split(".")[0]) >= 7
    return flags


def header(r: Any) -> str:
    """The allow-oom header for a script of the caller's, or "" before Redis 7."""
    return ALLOW_OOM if script_flags(r) else ""


def execute(r: Any, pipe: Any) -> None:
    """Run the commands staged on a redis-py pipeline atomically, even at maxmemory.

    Their replies are not returned: for pipelines of writes whose results are unused.
    """
    if not script_flags(r) or any(
        str(command[0]).upper() in _SCRIPT_COMMANDS for command, _ in pipe.command_stack
    ):
        # A script cannot call another script: such a pipeline runs as a plain MULTI.
        pipe.execute()
        return
    args: list[Any] = []
    for command, _options in pipe.command_stack:
        args += [len(command), *command]
    pipe.reset()
    if args:
        r.eval(_RUN, 0, *args)
