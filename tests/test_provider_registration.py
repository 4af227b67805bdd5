"""The provider registers with Airflow: entry point, provider info, and the airflow CLI sees it."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from airflow_provider_synth.get_provider_info import get_provider_info

AIRFLOW = str(Path(sys.executable).parent / "airflow")


def test_every_registered_module_and_class_imports() -> None:
    info = get_provider_info()
    assert info["package-name"] == "airflow-provider-synth"
    for section in ("hooks", "operators", "sensors", "triggers"):
        for entry in info.get(section, []):
            for module in entry["python-modules"]:
                importlib.import_module(module)
    for conn in info["connection-types"]:
        module, _, cls = conn["hook-class-name"].rpartition(".")
        assert hasattr(importlib.import_module(module), cls)
        for field in conn.get("conn-fields", {}).values():
            assert "schema" in field and "label" in field
    for link in info.get("extra-links", []):
        module, _, cls = link.rpartition(".")
        assert hasattr(importlib.import_module(module), cls)


def test_entry_point_declared() -> None:
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_provider_synth")]
    assert eps and eps[0].load()() == get_provider_info()


def _airflow(*args: str) -> str:
    env = dict(os.environ)
    out = subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=300, check=True)
    return out.stdout


def test_airflow_cli_lists_and_gets_the_provider() -> None:
    listed = json.loads(_airflow("providers", "list", "--output", "json"))
    assert any(p["package_name"] == "airflow-provider-synth" for p in listed)
    got = _airflow("providers", "get", "airflow-provider-synth", "--output", "json")
    assert "airflow-provider-synth" in got
    hooks = _airflow("providers", "hooks", "--output", "json")
    assert "synth_openai" in hooks


def test_task_decorators_registered_and_importable() -> None:
    info = get_provider_info()
    names = {d["name"]: d["class-name"] for d in info["task-decorators"]}
    assert set(names) == {"synth_openai_batch", "synth_cortex_batch", "synth_vllm_batch"}
    assert "llm_batch" not in names  # the common-ai provider's name
    for name, path in names.items():
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), name
