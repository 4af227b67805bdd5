"""The [testing] extra: its pytest plugin is registered by entry point, light to load, and ships no test
double that patches a client with ``unittest.mock`` (those live in tests/fakes)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "airflow_provider_synth.testing.pytest_plugin"


def test_the_plugin_is_a_pytest11_entry_point_named_like_its_module() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {PLUGIN: PLUGIN}
    assert "pytest" in " ".join(project["optional-dependencies"]["testing"])


def test_loading_the_plugin_starts_no_server_and_gives_its_fixtures() -> None:
    script = ("import json, sys; before = set(sys.modules); import " + PLUGIN + " as p; "
              "print(json.dumps([sorted(set(sys.modules) - before), hasattr(p, 'batch_server'), "
              "hasattr(p, 'batch_server_factory')]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, has_server, has_factory = json.loads(out.stdout.strip().splitlines()[-1])
    assert has_server and has_factory
    heavy = ("airflow_provider_synth.server", "aiohttp", "airflow")
    assert [m for m in loaded if any(m == h or m.startswith(h + ".") for h in heavy)] == []


def test_no_shipped_module_uses_unittest_mock() -> None:
    users = []
    for path in (ROOT / "airflow_provider_synth").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "unittest" or n.startswith("unittest.") for n in names):
                users.append(str(path.relative_to(ROOT)))
    assert users == []


def test_batch_server_fixture_from_the_plugin(batch_server) -> None:
    """The fixture works in this session (through the entry point once installed, else tests/conftest.py)."""
    assert batch_server.url.startswith("http://127.0.0.1:")
