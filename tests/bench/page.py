"""docs/benchmarks.md's generated section: the table `python -m tests.bench` prints, written
between the page's markers, everything outside them left as written by hand.

Each row carries when and on which commit it was measured, so a run of some benchmarks
replaces their rows and keeps the others' (the latest figure of each benchmark). A
benchmark that failed keeps its previous row.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
BEGIN = "<!-- bench-table -->"
END = "<!-- /bench-table -->"
INTRO = "Written by `make bench` (`python -m tests.bench`); each row as its last run measured it."


class PageError(Exception):
    """The page has no generated section to write (its markers are missing or out of order)."""


@dataclass(frozen=True)
class Run:
    """Where and when a run measured: shown in the `measured` column of each of its rows."""

    when: str  # e.g. "2026-12-08 01:10 UTC"
    commit: str  # short hash, "+" when the tree had changes
    load: float  # the 1-minute load average at the end

    def stamp(self) -> str:
        return f"{self.when}, {self.commit}, load {self.load:.1f}"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _rows(section: str) -> tuple[list[str], dict[str, str]]:
    """The generated table's header lines and its rows by benchmark, if `section` is one."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    if INTRO not in section or len(lines) < 2:
        return [], {}
    return lines[:2], {_cells(line)[0]: line for line in lines[2:]}


def section(table: str, run: Run, errors: Collection[str] = (), old: str = "") -> str:
    """The generated section for `table` (tests.bench's markdown table) measured in `run`,
    merged into `old` (the section the page holds now): rows of benchmarks that did not run
    here, or failed (`errors`), are kept from `old`."""
    lines = table.strip().splitlines()
    header = [lines[0] + " measured |", lines[1] + "---|"]
    new = {
        _cells(line)[0]: f"{line} {run.stamp()} |"
        for line in lines[2:]
        if _cells(line)[0] not in errors
    }
    old_header, rows = _rows(old)
    if old_header != header:  # the columns changed: the old rows would not fit them
        rows = {}
    rows.update(new)  # a row measured again stays in its place; a new one comes last
    body = "\n".join([*header, *rows.values()])
    return f"\n{INTRO}\n\n{body}\n"


def update(text: str, table: str, run: Run, errors: Collection[str] = ()) -> str:
    """`text` (the page) with its generated section rewritten; PageError without markers."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise PageError(f"{PAGE.name} needs the lines {BEGIN} and {END}, in that order")
    inner = text[start + len(BEGIN) : end]
    return text[: start + len(BEGIN)] + section(table, run, errors, inner) + text[end:]


def write(table: str, run: Run, errors: Collection[str] = (), page: Path = PAGE) -> Path:
    """Rewrite the page's generated section in place; returns the page's path."""
    page.write_text(update(page.read_text(), table, run, errors))
    return page
