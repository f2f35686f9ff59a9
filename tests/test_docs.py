"""README and docs/ stay true to the tree: README is short, its Layout names every module of the
package, and every relative link in README.md and docs/*.md points to a file that exists.

    python -m pytest -q tests/test_docs.py

Reads files only: no Ray, no network.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 300
# A markdown link or image: [text](target) or ![alt](target); the target up to a space or ")".
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def section(text: str, title: str) -> str:
    """The body of the `## <title>` section: up to the next heading of level 1 or 2."""
    m = re.search(rf"^## {re.escape(title)}[^\n]*\n(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def relative_links(path: Path) -> list[str]:
    """Link targets of a markdown file that name a file (outside code blocks; not URLs, not
    #anchors; an anchor after a file name is dropped)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def test_readme_is_at_most_300_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md is {lines} lines (at most {MAX_README_LINES}): move measurements and deep "
        "dives to docs/*.md and link them")


def test_readme_layout_lists_every_module_of_the_package():
    layout = section(README.read_text(encoding="utf-8"), "Layout")
    modules = sorted(p.name for p in (REPO / "cifar_ray").glob("*.py"))
    assert modules, "no cifar_ray/*.py found"
    missing = [m for m in modules if f"cifar_ray/{m}" not in layout]
    assert not missing, f"README's Layout section has no line for: {missing}"


def test_every_relative_link_in_readme_and_docs_points_to_an_existing_file():
    broken = []
    for md in markdown_files():
        for target in relative_links(md):
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(REPO)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_the_link_finder_sees_links_and_images_and_skips_urls_and_anchors(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("[a](docs/a.md) ![b](../tests/s.jpg) [c](https://x.org/y) [d](#tests) "
                  "[e](b.md#part) [f](mailto:x@y.z)\n```\nx[0](y)\n```\n", encoding="utf-8")
    assert relative_links(md) == ["docs/a.md", "../tests/s.jpg", "b.md"]
