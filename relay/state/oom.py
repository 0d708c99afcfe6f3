"""Worker writes that Redis accepts at maxmemory (scripts flagged `allow-oom`, Redis 7+).

At `maxmemory` with `noeviction` Redis refuses every command that may grow memory, and
every command queued in a MULTI, even a read. A worker's writes only move work already in
Redis (queue to delayed set or dead letters) or are a few bytes of bookkeeping, while each
message it acknowledges frees its whole body, so they are let through; ingest's are not
(its admission check stops it first). On servers before 7 everything runs as usual.
"""

from __future__ import annotations

import weakref
from typing import Any

import structlog

from relay import keys
from relay.state import lua

ALLOW_OOM = "#!lua flags=allow-oom\n"

# Each staged script becomes a function of its own KEYS and ARGV (a script cannot call
# another script, but it can hold its text), defined before the runner.
_SCRIPT = "SCRIPTS[{n}] = function(KEYS, ARGV)\n{body}\nend\n"
# Runs the staged commands and scripts in order, as one script: atomic, as the MULTI it
# replaces (and, like MULTI, not rolled back if a command fails). Its KEYS and ARGV (the
# steps' layout): relay/state/lua/oom_run.lua.
_RUN = lua.read("oom_run")


_INLINED = frozenset({"EVAL", "EVALSHA"})
_NOT_INLINED = frozenset({"EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
# Lua's unpack gives at most 8,000 values: a longer command (a HSET of thousands of
# fields) makes the pipeline a MULTI instead.
MAX_UNPACK = 7_000

log = structlog.get_logger("relay.state")
_fell_back = False  # whether this process logged a plain MULTI (`_plain_transaction`)

# Asked once per client: the scripts of a client's users carry the header they chose at
# start (`header`) anyway, and an INFO per settlement would be a round trip per write.
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
    """Run the commands staged on a redis-py pipeline atomically, even at maxmemory: one
    script, the staged scripts (EVAL, or EVALSHA of a registered script) inlined.

    Their replies are not returned: for pipelines of writes whose results are unused.
    One reply, where a MULTI has one per command: a settlement stages hundreds.
    """
    if not script_flags(r):
        pipe.execute()
        return
    known = {script.sha: script.script for script in pipe.scripts}
    bodies: dict[str, int] = {}  # a staged script's text -> its number in the script
    args: list[Any] = []
    for command, _options in pipe.command_stack:
        name = str(command[0]).upper()
        if (
            name in _NOT_INLINED
            or (name == "EVALSHA" and command[1] not in known)
            or (name not in _INLINED and len(command) > MAX_UNPACK)
        ):
            _plain_transaction(pipe, name)
            return
        if name not in _INLINED:
            args += [len(command), *command]
            continue
        body = known[command[1]] if name == "EVALSHA" else command[1]
        number = bodies.setdefault(_text(body), len(bodies) + 1)
        rest = command[3:]
        args += [0, number, command[2], len(rest), *rest]
    pipe.reset()
    if args:
        functions = "".join(_SCRIPT.format(n=n, body=body) for body, n in bodies.items())
        r.eval(f"{ALLOW_OOM}local SCRIPTS = {{}}\n{functions}{_RUN}", 0, *args)


def _plain_transaction(pipe: Any, command: str) -> None:
    """Run the pipeline as a plain MULTI, as before Redis 7: refused at maxmemory. Counted
    in the same MULTI; logged once per process (the command that could not be inlined)."""
    global _fell_back  # once per process, whichever client
    if not _fell_back:
        _fell_back = True
        log.warning("oom_plain_transaction", command=command, refused_at_maxmemory=True)
    pipe.hincrby(keys.STATS, keys.Stat.OOM_FALLBACKS, 1)
    pipe.execute()


def _text(body: str | bytes) -> str:
    """A script's text without its flags line (the whole script has its own)."""
    text = body.decode() if isinstance(body, bytes) else body
    return text.split("\n", 1)[1] if text.startswith("#!") else text
