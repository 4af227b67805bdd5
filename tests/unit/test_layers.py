"""What a worker imports: an operator module pulls in no server, no test double, no other backend, and nothing
its task does not run; the CLI never reaches into operators/. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: never imported by a task: the local Batch API server, the test doubles, test tools, the async-only stack
EVERYWHERE = ("airflow_provider_synth.server", "airflow_provider_synth.testing", "unittest", "pytest", "fakesnow",
              "duckdb", "vllm", "torch", "aiohttp.web", "airflow_provider_synth.hooks.openai_pool")

CASES = {
    # module: what else it must not import (another backend, the async transport, the request validator)
    "airflow_provider_synth.operators.openai_batch": ("snowflake", "airflow.providers.snowflake", "aiohttp"),
    "airflow_provider_synth.operators.cortex": ("openai", "httpx2"),
    "airflow_provider_synth.operators.anthropic": ("openai", "snowflake", "airflow.providers.snowflake", "aiohttp",
                                                   "airflow_provider_synth.hooks.openai"),
    "airflow_provider_synth.operators.vllm": ("openai", "snowflake", "aiohttp", "httpx2"),
    "airflow_provider_synth.operators.cleanup": ("snowflake", "aiohttp", "numpy", "airflow_provider_synth.batch.validate"),
    "airflow_provider_synth.sensors.openai_batch": ("snowflake", "aiohttp", "numpy",
                                                    "airflow_provider_synth.batch.validate"),
    # the DAG parses without the [bedrock] extra: the hook (amazon provider, boto3) is imported by execute()
    "airflow_provider_synth.operators.bedrock": ("openai", "snowflake", "boto3", "botocore", "aiobotocore",
                                                 "airflow.providers.amazon", "aiohttp"),
    "airflow_provider_synth.cli": ("airflow_provider_synth.operators", "snowflake", "aiohttp"),
}

SCRIPT = """
import importlib, json, sys
import airflow.sdk, airflow.providers.common.compat.sdk  # what every task has loaded already
before = set(sys.modules)
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _imported(module: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, module], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", sorted(CASES))
def test_importing_a_worker_module_loads_only_what_its_task_runs(module: str) -> None:
    forbidden = EVERYWHERE + CASES[module]
    loaded = [m for m in _imported(module) if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert loaded == []


ENGINE_SCRIPT = """
import importlib, json, pkgutil, sys
before = set(sys.modules)  # what the interpreter loads at start-up (.pth files)
import airflow_provider_synth.engine.vllm as pkg
for info in pkgutil.iter_modules(pkg.__path__):
    if info.name != "__main__":
        importlib.import_module(pkg.__name__ + "." + info.name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_the_vllm_engine_package_imports_only_the_core() -> None:
    """The code that runs inside the vLLM interpreter (which has no Airflow) imports only ``batch/`` and the
    standard library, whatever module of it is loaded."""
    out = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    ours = [m for m in loaded if m.startswith("airflow_provider_synth.")]
    assert [m for m in ours if not m.startswith(("airflow_provider_synth.batch", "airflow_provider_synth.engine"))] == []
    assert [m for m in loaded if m.split(".")[0] in ("airflow", "vllm", "torch", "openai", "snowflake")] == []


def test_the_vllm_engine_package_has_no_import_cycle() -> None:
    """Each module of ``engine/vllm`` imports (at module level or inside a function) only modules of the
    package that do not import it back, directly or not."""
    import ast
    from pathlib import Path

    import airflow_provider_synth.engine.vllm as pkg

    root = Path(pkg.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        name = path.stem
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(pkg.__name__ + "."):
                deps.add(node.module.rsplit(".", 1)[1])  # type: ignore[union-attr]
    assert graph["runner"] and graph["chat"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m, set())] == []
