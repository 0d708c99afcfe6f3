"""The relay's longer Redis scripts, one `<name>.lua` file each (package data), whose header
comment names every KEYS and ARGV entry; the shorter ones stay beside their callers."""

from __future__ import annotations

from importlib import resources


def read(name: str) -> str:
    """The script `<name>.lua` as Redis runs it: its text after the header comment."""
    lines = resources.files(__name__).joinpath(f"{name}.lua").read_text().splitlines(True)
    start = next((n for n, line in enumerate(lines) if not line.startswith("--")), len(lines))
    return "".join(lines[start:])
