"""The README is a short front door, and every relative link of the docs leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.procs import ROOT

README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 220

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without code blocks and inline code, where link syntax means nothing."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    plain = heading.replace("`", "").strip().lower()
    plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", plain)
    return re.sub(r"[^\w\- ]", "", plain).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page (a repeated heading gets -1, -2... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    """The links of a page that point into the repository (no scheme, no mailto)."""
    targets = LINK.findall(_prose(page.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_readme_is_a_front_door() -> None:
    """At most 220 lines, and the two commands a new machine needs."""
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    assert "make run" in text
    assert "make test" in text


def test_docs_exist() -> None:
    """The pages the README links to are there."""
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {
        "configuration.md", "segment-setup.md", "operations.md", "reliability.md",
        "sizing.md", "architecture.md", "benchmarks.md", "development.md",
    } <= names  # fmt: skip


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    """Every relative link names an existing file, and its anchor a heading of that file."""
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_anchor_is_githubs() -> None:
    """Headings become anchors as GitHub makes them."""
    assert anchor("Production Redis: Sentinel, TLS, failover") == (
        "production-redis-sentinel-tls-failover"
    )
    assert anchor("Preview, dry run, trace") == "preview-dry-run-trace"
    assert anchor("`relay` CLI") == "relay-cli"


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """The link check sees a missing file and a missing heading."""
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n")
    page.write_text(
        "[ok](other.md#a-part) [gone](missing.md) [no anchor](other.md#nope) "
        "[web](https://example.com) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
    )
    assert relative_links(page) == ["other.md#a-part", "missing.md", "other.md#nope"]
    assert anchors(tmp_path / "other.md") == {"other", "a-part"}
