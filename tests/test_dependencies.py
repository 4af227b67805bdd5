"""Declared dependencies = imported dependencies: every third-party import of the package is declared (in the
core list, or in the extra of the feature that uses it), and every core dependency is imported somewhere."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import lru_cache
from importlib.metadata import packages_distributions as _packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "airflow_provider_synth"
#: imported only by the vLLM engine's own interpreter (engine/vllm/), never installed beside Airflow
ENGINE_ONLY = {"vllm"}
#: Airflow's namespace: the distribution a module path belongs to
AIRFLOW_PROVIDERS = re.compile(r"^airflow\.providers\.([a-z_]+(?:\.[a-z_]+)?)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {_norm(re.split(r"[\[<>=!~;\s]", r, maxsplit=1)[0]) for r in reqs}

    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


def _airflow_distribution(module: str) -> str:
    match = AIRFLOW_PROVIDERS.match(module)
    if not match:
        return "apache-airflow"
    parts = match.group(1).split(".")
    for n in (2, 1):  # common.compat -> apache-airflow-providers-common-compat; snowflake -> ...-snowflake
        candidate = "apache-airflow-providers-" + "-".join(parts[:n]).replace("_", "-")
        if n <= len(parts) and candidate in _installed_airflow_dists():
            return candidate
    return "apache-airflow-providers-" + parts[0].replace("_", "-")


@lru_cache(maxsize=1)
def packages_distributions() -> dict[str, list[str]]:
    """importlib's map of top-level modules to distributions, read once: it reads every installed
    distribution's file list, minutes per call in a venv with botocore, moto and the docs tool chain."""
    return dict(_packages_distributions())


@lru_cache(maxsize=1)
def _installed_airflow_dists() -> set[str]:
    return {_norm(d) for ds in packages_distributions().values() for d in ds if d.startswith("apache-airflow")}


def _imports() -> dict[str, set[str]]:
    """distribution (or top-level module when unknown) -> the package files importing it."""
    dists = packages_distributions()
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "airflow_provider_synth" or top in ENGINE_ONLY:
                    continue
                if top == "airflow":
                    names = {_airflow_distribution(module)}
                else:
                    names = {_norm(d) for d in dists.get(top, [top])}
                key = "|".join(sorted(names))
                found.setdefault(key, set()).add(rel)
    return found


def test_every_import_is_declared() -> None:
    core, extras = _declared()
    everywhere = core.union(*extras.values())
    undeclared = {}
    for key, files in _imports().items():
        names = set(key.split("|"))
        # the [testing] extra (test doubles, the pytest plugin) declares what it imports itself
        allowed = core | extras["testing"] if all(f.startswith("testing/") for f in files) else everywhere
        if not names & allowed:
            undeclared[key] = sorted(files)
    assert undeclared == {}


def test_every_core_dependency_is_imported() -> None:
    core, _ = _declared()
    imported = {n for key in _imports() for n in key.split("|")}
    assert sorted(core - imported) == []
