"""Every target the Makefile declares has a recipe (issue 21: ``make unit`` was declared and listed, with none)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _dry_run(target: str) -> str:
    # -o: treat the venv stamps as up to date, so the dry run never plans an install
    done = subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", ".venv-vllm/.installed", target],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_every_phony_target_has_a_recipe() -> None:
    text = (REPO / "Makefile").read_text()
    (phony,) = re.findall(r"^\.PHONY:(.*)$", text, flags=re.M)
    missing = [t for t in phony.split() if not re.search(rf"^{re.escape(t)}:", text, flags=re.M)]
    assert not missing, f"declared in .PHONY without a rule: {missing}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_unit_runs_the_unit_tests_only() -> None:
    commands = _dry_run("unit")
    assert re.search(r"pytest -q tests/unit -m \"not integration\"", commands), commands
    assert "tests/integration" not in commands
