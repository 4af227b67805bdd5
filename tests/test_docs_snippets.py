"""Every snippet the docs include (``literalinclude`` of example DAGs) exists: the file and both markers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r"```\{literalinclude\}\s+(?P<path>\S+)\n(?P<options>(?::[^\n]*\n)*)")
OPTION = re.compile(r':(?P<name>start-after|end-before):\s*"?(?P<value>[^"\n]*)"?')


def includes() -> list[tuple[str, Path, dict[str, str]]]:
    found = []
    for doc in sorted((ROOT / "docs").rglob("*.md")):
        for match in INCLUDE.finditer(doc.read_text()):
            options = {m["name"]: m["value"].strip() for m in OPTION.finditer(match["options"])}
            found.append((f"{doc.relative_to(ROOT)} -> {match['path']}", (doc.parent / match["path"]).resolve(),
                          options))
    return found


def test_docs_include_snippets() -> None:
    assert includes(), "the docs include example DAG snippets with literalinclude"


@pytest.mark.parametrize(("where", "path", "options"), includes(), ids=lambda v: v if isinstance(v, str) else "")
def test_included_snippet_exists(where: str, path: Path, options: dict[str, str]) -> None:
    assert path.is_file(), f"{where}: no such file"
    text = path.read_text()
    start, end = options.get("start-after"), options.get("end-before")
    if start:
        assert start in text, f"{where}: no marker {start!r}"
    if end:
        assert end in text, f"{where}: no marker {end!r}"
    if start and end:
        snippet = text[text.index(start) + len(start):text.index(end)]
        assert snippet.strip(), f"{where}: empty snippet"
