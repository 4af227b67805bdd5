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
