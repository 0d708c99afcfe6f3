"""Identity files for `relay identities import`: users known before the relay ran.

CSV with a header row, or JSON Lines of objects; the fields are `userId` or
`anonymousId` (or both), `accountExternalId` (required) and `contactExternalId`
(optional: without it the contact comes from the mapping's contact order). `…ID`
spellings are accepted. The whole file is checked before anything is written: a bad
row stops the import with its line number, and the map is unchanged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from relay.errors import IdentityFileError
from relay.resolution import ACCOUNT_KEYS, CONTACT_KEYS, Known, id_value

MAX_ID = 100
MAX_ERRORS = 10


def _rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    stripped = text.lstrip()
    if path.suffix.lower() == ".csv" or (path.suffix.lower() not in (".jsonl", ".ndjson", ".json")
                                         and not stripped.startswith("{")):  # fmt: skip
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield reader.line_num, row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield number, f"not JSON: {exc}"


def _field(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, str | None]:
    """The id under any of `names`, or a problem."""
    for name in names:
        raw = row.get(name)
        if raw is None or raw == "":
            continue
        value = id_value(raw)
        if value is None:
            return None, f"{name} is not an id"
        if len(value) > MAX_ID:
            return None, f"{name} is longer than {MAX_ID} characters"
        return value, None
    return None, None


def _entry(row: Any) -> tuple[dict[str, Known], list[str]]:
    if isinstance(row, str):
        return {}, [row]
    if not isinstance(row, dict):
        return {}, ["not an object"]
    problems: list[str] = []
    user, p1 = _field(row, ("userId",))
    anonymous, p2 = _field(row, ("anonymousId",))
    account, p3 = _field(row, ACCOUNT_KEYS)
    contact, p4 = _field(row, CONTACT_KEYS)
    problems += [p for p in (p1, p2, p3, p4) if p]
    if user is None and anonymous is None and not (p1 or p2):
        problems.append("userId or anonymousId is required")
    if account is None and not p3:
        problems.append("accountExternalId is required")
    if problems:
        return {}, problems
    known = Known(account, contact)
    keys = (["u:" + user] if user else []) + (["a:" + anonymous] if anonymous else [])
    return dict.fromkeys(keys, known), []


def read(path: Path) -> dict[str, Known]:
    """Every identity in the file by map key, or IdentityFileError naming bad lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityFileError(f"{path}: cannot read: {exc}") from None
    found: dict[str, Known] = {}
    errors: list[str] = []
    for number, row in _rows(path, text):
        entries, problems = _entry(row)
        errors += [f"line {number}: {p}" for p in problems]
        found.update(entries)
    if errors:
        more = f" (and {len(errors) - MAX_ERRORS} more)" if len(errors) > MAX_ERRORS else ""
        raise IdentityFileError(f"{path}: " + "; ".join(errors[:MAX_ERRORS]) + more)
    if not found:
        raise IdentityFileError(f"{path}: no identities in the file")
    return found
