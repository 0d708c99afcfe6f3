"""relay/state/lua: every script file's header names each KEYS and ARGV entry its code
uses, and what Redis runs is the code without the header."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from relay.state import lua

SCRIPTS = sorted(
    p.name.removesuffix(".lua")
    for p in resources.files(lua.__name__).iterdir()
    if p.name.endswith(".lua")
)


def _header_and_code(name: str) -> tuple[str, str]:
    text = resources.files(lua.__name__).joinpath(f"{name}.lua").read_text()
    code = lua.read(name)
    return text[: len(text) - len(code)], code


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_header_names_every_keys_and_argv_entry_the_code_uses(name: str) -> None:
    header, code = _header_and_code(name)
    used = set(re.findall(r"\b(KEYS|ARGV)\[(\d+)\]", code))
    named = set(re.findall(r"\b(KEYS|ARGV)\[(\d+)\]", header))
    # An entry may be named in a range ("ARGV[5...]": the rest of the arguments).
    ranges = {(kind, int(n)) for kind, n in re.findall(r"\b(KEYS|ARGV)\[(\d+)\.\.\.", header)}
    unnamed = {
        (kind, n)
        for kind, n in used - named
        if not any(k == kind and int(n) >= first for k, first in ranges)
    }
    assert not unnamed, f"{name}.lua uses {sorted(unnamed)} without naming them in its header"
    assert "KEYS" in header and "ARGV" in header


@pytest.mark.parametrize("name", SCRIPTS)
def test_what_redis_runs_has_no_header_line(name: str) -> None:
    header, code = _header_and_code(name)
    assert header.strip() and code.strip()
    assert not code.startswith("--")


def test_the_lease_script_is_read_from_its_first_line_of_code() -> None:
    assert lua.read("lease").lstrip().startswith("local t = redis.call('TIME')")
