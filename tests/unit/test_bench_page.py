"""tests.bench.page: `make bench` writes its table into docs/benchmarks.md between the
markers, keeps what is outside them, and keeps the rows of benchmarks it did not run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.bench import page
from tests.bench.__main__ import table

HAND = "# Benchmarks\n\nWritten by hand: how to read the table.\n\n"
PAGE = f"{HAND}{page.BEGIN}\nLast measured by hand: a diary.\n{page.END}\n\nAfter.\n"
FIRST = page.Run(when="2026-12-08 01:00 UTC", commit="abc1234", load=2.5)
SECOND = page.Run(when="2026-12-09 02:00 UTC", commit="def5678+", load=0.75)


def result(name: str, per_s: float, **extra: Any) -> dict[str, Any]:
    """A benchmark's result as tests.bench records it (the fields the table reads)."""
    return {"name": name, "events_per_s": per_s, "baseline_per_s": per_s * 2, "ratio": 0.5,
            "cpu_ratio": None, "p99_ms": 12.5, "target": "≥ 0.5", "met": True,
            "achieved_rps": per_s, "limit_rps": 50, "throttled_fraction": 0.0, **extra}  # fmt: skip


def rows(text: str) -> dict[str, str]:
    inner = text[text.index(page.BEGIN) : text.index(page.END)]
    return {
        line.split("|")[1].strip(): line for line in inner.splitlines() if line.startswith("| ")
    }


def test_the_table_replaces_what_is_between_the_markers_and_nothing_else() -> None:
    text = page.update(PAGE, table([result("ratelimit", 49.5)]), FIRST)
    assert text.startswith(HAND + page.BEGIN) and text.endswith(f"{page.END}\n\nAfter.\n")
    assert "a diary" not in text
    assert page.INTRO in text
    assert rows(text)["ratelimit"].endswith("| 2026-12-08 01:00 UTC, abc1234, load 2.5 |")
    assert "| 50 |" in rows(text)["ratelimit"]  # the events/s column, as the run printed it
    assert list(rows(text)) == ["benchmark", "ratelimit"]


def test_a_later_run_replaces_its_rows_in_place_and_keeps_the_others() -> None:
    first = page.update(PAGE, table([result("ratelimit", 49.5), result("adaptive", 45.0)]), FIRST)
    second = page.update(first, table([result("ratelimit", 50.0), result("quick", 9.0)]), SECOND)
    assert list(rows(second)) == ["benchmark", "ratelimit", "adaptive", "quick"]
    assert SECOND.stamp() in rows(second)["ratelimit"]
    assert rows(second)["adaptive"] == rows(first)["adaptive"]  # not run again: kept
    assert page.update(second, table([result("quick", 9.0)]), SECOND).count(page.INTRO) == 1


def test_a_failed_benchmark_keeps_its_previous_row() -> None:
    first = page.update(PAGE, table([result("quick", 9.0)]), FIRST)
    failed = {"name": "quick", "error": "RuntimeError: no sandbox"}
    second = page.update(first, table([failed]), SECOND, errors={"quick"})
    assert rows(second)["quick"] == rows(first)["quick"]


def test_a_page_without_markers_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text(HAND)
    with pytest.raises(page.PageError, match="bench-table"):
        page.write(table([result("ratelimit", 49.5)]), FIRST, page=path)
    assert path.read_text() == HAND


def test_the_real_page_has_its_markers_in_order() -> None:
    text = page.PAGE.read_text()
    assert 0 <= text.index(page.BEGIN) < text.index(page.END)
