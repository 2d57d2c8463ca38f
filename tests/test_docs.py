"""The docs hold together: every relative link resolves, and the production checklist is linked
from both indexes and covers what a deployment must settle (docs/production.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    for target in LINK_RE.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: {target} names no heading of {resolved.name}"


def test_the_production_checklist_is_linked_and_covers_a_deployment() -> None:
    assert "(production.md)" in (ROOT / "docs" / "README.md").read_text()
    assert "(docs/production.md)" in (ROOT / "README.md").read_text()
    text = (ROOT / "docs" / "production.md").read_text()
    for topic in (
        "Egress only through the proxy",
        "TLS in front",
        "/-/metrics",
        "/-/status",
        "noeviction",
        "appendonly",
        "requirepass",
        "virtual keys",
        "Alert routing",
        "spend-guard store recover",
    ):
        assert topic.lower() in text.lower(), topic
