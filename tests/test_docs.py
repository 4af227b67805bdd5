"""Every snippet the docs include exists: the file, and its [START]/[END] markers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
# at a line's start: not the indented example of the directive in writing_docs.md
INCLUDE = re.compile(r"^```\{literalinclude\}\s+(\S+)\s*\n(.*?)```", re.S | re.M)


def includes():
    for page in sorted(DOCS.rglob("*.md")):
        for match in INCLUDE.finditer(page.read_text()):
            yield pytest.param(page, match.group(1), match.group(2), id=f"{page.name}:{match.group(1)}")


@pytest.mark.parametrize("page,target,options", list(includes()))
def test_included_snippet_exists(page: Path, target: str, options: str) -> None:
    path = (page.parent / target).resolve()
    assert path.is_file(), f"{page} includes missing {target}"
    text = path.read_text()
    for key in ("start-after", "end-before"):
        m = re.search(rf":{key}:\s*\"?([^\"\n]+)\"?", options)
        if m:
            assert m.group(1) in text, f"{page}: marker {m.group(1)!r} not in {target}"


def test_docs_include_snippets_at_all() -> None:
    assert len(list(includes())) >= 3


def test_relative_links_resolve() -> None:
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), f"{page}: broken link {target}"
