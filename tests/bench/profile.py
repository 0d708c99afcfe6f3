"""A py-spy profile of a running worker, summarised: where its time goes, by function and
by kind of work.

`Spy` runs `py-spy record --nonblocking` on one process while a load runs (the process is
never paused, so the figures are those of an unprofiled worker, give or take the
sampling), writing the samples in py-spy's raw (collapsed stack) format. Two kinds:

- CPU (default, `--gil`): each sample is the stack of the thread holding the interpreter
  lock. The worker's Python runs on one core at a time, so these shares are its CPU, and
  what bounds its rate once the CPU is the limit. C code that lets go of the lock (a
  socket's send) is not in them.
- Wall (`wall=True`, `--idle`): every thread's stack at each sample, waiting or not; the
  summary keeps the pool threads (those running a task), so the shares say where a
  batch's time goes, waits on Redis and on ChurnZero included.

`summary` reads a profile back:
- Own time: the samples a function was on top of the stack.
- Cumulative time: the samples a function was anywhere in the stack (once per sample).
- Buckets: each sample counted once, for the innermost frame whose module says what
  kind of work it is (a socket read inside redis-py is Redis; inside aiohttp, HTTP).

`python -m tests.bench.profile FILE [--wall]` prints the summary of a profile written before.
"""

from __future__ import annotations

import functools
import linecache
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATE_HZ = 100
TOP = 15

# (bucket, pattern on a frame's file path), tried in this order on each frame from the
# top of the stack down; the first frame that matches any names the sample's bucket.
BUCKETS: list[tuple[str, re.Pattern[str]]] = [
    ("logging", re.compile(r"(^|/)(structlog|logging)/|relay/logs\.py")),
    (
        "JSON / decode",
        re.compile(
            r"(^|/)(json|orjson|base64|zlib|gzip|isal|pybase64)[/.]|relay/(wire|envelope)\.py"
            r"|kombu/(serialization|compression|utils/json)\.py"
        ),
    ),
    ("pydantic parsing", re.compile(r"(^|/)pydantic(_core)?/|relay/events\.py")),
    (
        "translation / plan",
        re.compile(r"relay/(translate|mapping|plan|commands|resolution|clock|eiv|reasons)\.py"),
    ),
    (
        "Redis round trips",
        re.compile(r"(^|/)redis/|kombu/transport/|relay/state/"),
    ),
    (
        "HTTP send",
        re.compile(
            r"(^|/)(aiohttp|yarl|multidict|aiohappyeyeballs|asyncio|ssl)/|"
            r"relay/delivery/churnzero\.py"
        ),
    ),
    (
        "Celery / kombu overhead",
        re.compile(r"(^|/)(celery|kombu|billiard|vine|amqp|click)/|workers/"),
    ),
    ("relay delivery (other)", re.compile(r"relay/")),
]
OTHER = "other"
# `name (path/to/file.py:123)`: py-spy's frame label. Rows are per function, not line.
_FRAME = re.compile(r"^(?P<name>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
# A C extension's time shows as the Python line that called it: on the top frame, the
# line's text says whose it is (orjson, zlib, pydantic-core have no Python frames).
_LEAF_CALLS: list[tuple[str, re.Pattern[str]]] = [
    (
        "JSON / decode",
        re.compile(
            r"\b(orjson|json|zlib|isal_zlib|pybase64|base64)\.|\b(loads|dumps|b64decode|"
            r"b64encode|decompress|compress)\("
        ),
    ),
    (
        "pydantic parsing",
        re.compile(r"validate_python|validate_json|model_validate|model_dump|model_construct"),
    ),
]


def binary() -> str:
    """The py-spy beside this interpreter, else the one on PATH; RuntimeError if none."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found: `.venv/bin/pip install py-spy`")
    return found


class Spy:
    """`py-spy record` on `pid` until `stop()`, samples written to `path`: the thread
    holding the interpreter lock (CPU), or with `wall` every thread, idle or not."""

    def __init__(self, pid: int, path: Path, rate_hz: int = RATE_HZ, wall: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = ["--idle", "--threads"] if wall else ["--gil"]
        self._proc = subprocess.Popen(
            [binary(), "record", "--pid", str(pid), "--nonblocking", *mode, "--format", "raw",
             "--rate", str(rate_hz), "--full-filenames", "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop sampling and wait until the file is written; RuntimeError if py-spy failed."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            _, err = self._proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        if not self.path.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")


@dataclass(frozen=True)
class Frame:
    """One frame of a sample: `name (file)` as the tables show it, where it runs."""

    label: str
    path: str
    line: int


def _frame(text: str) -> Frame:
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(text.strip(), "", 0)
    path = match["path"]
    return Frame(f"{match['name']} ({_short(path)})", path, int(match["line"] or 0))


@functools.lru_cache(maxsize=4096)
def _source(path: str, line: int) -> str:
    return linecache.getline(path, line) if line else ""


def _short(path: str) -> str:
    """A frame's file path from its package on: site-packages/ and the checkout dropped."""
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            return path.split("/", 1)[1] if marker == "/lib/python3" and "/" in path else path
    for root in ("relay/", "workers/", "tests/"):
        if f"/{root}" in path:
            return root + path.rsplit(f"/{root}", 1)[1]
    return path


def bucket_of(frames: list[Frame]) -> str:
    """The bucket of a sample's stack, given innermost first."""
    if frames:
        text = _source(frames[0].path, frames[0].line)
        for name, pattern in _LEAF_CALLS:
            if pattern.search(text):
                return name
    for frame in frames:
        for name, pattern in BUCKETS:
            if pattern.search(frame.path):
                return name
    return OTHER


@dataclass
class Summary:
    """A profile's samples by function and by bucket."""

    samples: int
    own: Counter[str]
    cumulative: Counter[str]
    buckets: Counter[str]

    def as_dict(self, top: int = TOP) -> dict[str, Any]:
        def share(n: int) -> float:
            return round(100 * n / self.samples, 1) if self.samples else 0.0

        return {
            "samples": self.samples,
            "buckets_pct": {k: share(v) for k, v in self.buckets.most_common()},
            "top_own_pct": {k: share(v) for k, v in self.own.most_common(top)},
            "top_cumulative_pct": {k: share(v) for k, v in self.cumulative.most_common(top)},
        }


# A frame every pool thread running a Celery task has (the wall profile's threads of interest).
POOL_FRAME = "apply_target"


def summary(path: Path, within: str | None = None) -> Summary:
    """The summary of a py-spy raw profile; with `within`, only the samples whose stack
    has a function of that name (e.g. POOL_FRAME)."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            _frame(f) for f in stack.split(";")
            if f and not f.startswith(("process ", "thread ("))
        ]  # fmt: skip
        if not frames or (within and not any(f.label.startswith(within) for f in frames)):
            continue
        samples += count
        own[frames[-1].label] += count
        for label in {f.label for f in frames}:
            cumulative[label] += count
        buckets[bucket_of(frames[::-1])] += count
    return Summary(samples, own, cumulative, buckets)


def headline(data: dict[str, Any], cpu_us_per_event: float | None = None) -> str:
    """One line: where the profiled CPU went, by kind of work, the largest first (in µs
    per event when the CPU per event is given)."""
    parts = [
        f"{name} {pct * cpu_us_per_event / 100:.1f} µs"
        if cpu_us_per_event
        else f"{name} {pct:.0f} %"
        for name, pct in data["buckets_pct"].items()
    ]
    per = f" ({cpu_us_per_event:.1f} µs per delivered event)" if cpu_us_per_event else ""
    return f"where the worker's CPU goes{per}: " + ", ".join(parts)


def render(
    data: dict[str, Any], cpu_us_per_event: float | None = None, title: str = "CPU profile"
) -> str:
    """A summary (from `Summary.as_dict`) as text; with the CPU per event, each share is
    also given in microseconds per event."""

    def row(name: str, pct: float) -> str:
        us = f"  {pct * cpu_us_per_event / 100:6.1f} µs/event" if cpu_us_per_event else ""
        return f"  {pct:5.1f} %{us}  {name}"

    lines = [f"{title}: {data['samples']:,} samples"]
    if cpu_us_per_event:
        lines[0] += f", {cpu_us_per_event:.1f} µs of CPU per delivered event"
    lines.append("by kind of work:")
    lines += [row(k, v) for k, v in data["buckets_pct"].items()]
    lines.append("top functions by own time:")
    lines += [row(k, v) for k, v in data["top_own_pct"].items()]
    lines.append("top functions by cumulative time:")
    lines += [row(k, v) for k, v in data["top_cumulative_pct"].items()]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--wall"]):
        print("usage: python -m tests.bench.profile PROFILE.txt [--wall]", file=sys.stderr)
        return 2
    if sys.argv[2:]:
        data = summary(Path(sys.argv[1]), within=POOL_FRAME).as_dict()
        print(render(data, title="wall profile of the pool threads"))
    else:
        print(render(summary(Path(sys.argv[1])).as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
