"""The provider registers with Airflow: entry point, provider info, and the airflow CLI sees it."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from airflow_provider_synth.get_provider_info import get_provider_info

AIRFLOW = str(Path(sys.executable).parent / "airflow")
#: registered modules that import an extra's provider at module level: module -> what it imports
NEEDS_EXTRA = {"airflow_provider_synth.hooks.bedrock": "airflow.providers.amazon"}


def test_every_registered_module_and_class_imports() -> None:
    info = get_provider_info()
    assert info["package-name"] == "airflow-provider-synth"
    for section in ("hooks", "operators", "sensors", "triggers"):
        for entry in info.get(section, []):
            for module in entry["python-modules"]:
                if _extra_missing(module):
                    continue  # the environment without the extra (make test-oldest)
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
    assert set(names) == {"synth_openai_batch", "synth_cortex_batch", "synth_vllm_batch", "synth_anthropic_batch",
                          "synth_bedrock_batch"}
    assert "llm_batch" not in names  # the common-ai provider's name
    for name, path in names.items():
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), name


# -- the registry against the package tree ----------------------------------------------------------------------

PACKAGE = "airflow_provider_synth"
#: the layers that hold what Airflow registers; runs/, batch/, server/ and testing/ hold none of it
REGISTERED_LAYERS = ("hooks", "operators", "sensors", "triggers", "decorators")


def _modules() -> list[str]:
    import pkgutil

    root = importlib.import_module(PACKAGE)
    names = [f"{PACKAGE}.links"]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{PACKAGE}."):
        # private modules (operators/_base.py, decorators/_base.py) hold the shared bases, not registered names
        if info.name.split(".")[1] in REGISTERED_LAYERS and not info.ispkg and \
                not info.name.rsplit(".", 1)[1].startswith("_"):
            names.append(info.name)
    return names


def _found() -> dict[str, set[str]]:
    """What the package defines, by registry section: module paths, class paths, connection types."""
    import inspect

    from airflow.sdk import BaseHook, BaseOperator, BaseOperatorLink, BaseSensorOperator
    from airflow.triggers.base import BaseTrigger

    found: dict[str, set[str]] = {k: set() for k in ("hooks", "operators", "sensors", "triggers",
                                                       "extra-links", "connection-types", "task-decorators")}
    for name in _modules():
        if _extra_missing(name):
            continue
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if getattr(obj, "__module__", None) != name:
                continue
            path = f"{name}.{getattr(obj, '__qualname__', '')}"
            if name.split(".")[1] == "decorators":  # only the decorator functions; their operators are internal
                if inspect.isfunction(obj) and "TaskDecorator" in str(inspect.signature(obj).return_annotation):
                    found["task-decorators"].add(path)
            elif inspect.isclass(obj) and issubclass(obj, BaseSensorOperator):
                found["sensors"].add(name)
            elif inspect.isclass(obj) and issubclass(obj, BaseOperator) and not inspect.isabstract(obj):
                found["operators"].add(name)
            elif inspect.isclass(obj) and issubclass(obj, BaseTrigger) and not inspect.isabstract(obj):
                found["triggers"].add(name)
            elif inspect.isclass(obj) and issubclass(obj, BaseHook):
                found["hooks"].add(name)
                if "conn_type" in vars(obj):  # a connection type of its own (not the snowflake provider's)
                    found["connection-types"].add(path)
            elif inspect.isclass(obj) and issubclass(obj, BaseOperatorLink):
                found["extra-links"].add(path)
    return found


def _extra_missing(module: str) -> bool:
    """The module needs an extra this environment lacks (make test-oldest installs no [bedrock])."""
    if module not in NEEDS_EXTRA:
        return False
    try:
        return importlib.util.find_spec(NEEDS_EXTRA[module]) is None
    except ModuleNotFoundError:
        return True


def _registered() -> dict[str, set[str]]:
    info = get_provider_info()
    reg = {k: {m for e in info.get(k, []) for m in e["python-modules"] if not _extra_missing(m)}
           for k in ("hooks", "operators", "sensors", "triggers")}
    reg["extra-links"] = set(info.get("extra-links", []))
    reg["connection-types"] = {c["hook-class-name"] for c in info.get("connection-types", [])}
    reg["task-decorators"] = {d["class-name"] for d in info.get("task-decorators", [])}
    return reg


def test_the_registry_lists_everything_the_package_defines() -> None:
    """Every hook, operator, sensor, trigger, extra link, connection type and task decorator in the package
    is registered, and nothing registered is missing: a class another change adds is caught here."""
    found, registered = _found(), _registered()
    assert {k: sorted(v) for k, v in found.items()} == {k: sorted(v) for k, v in registered.items()}


def test_config_sections_the_package_reads_are_registered() -> None:
    """A ``conf.get*("<section>", ...)`` on a section Airflow does not define needs a ``config`` entry."""
    import re

    from airflow.configuration import conf

    root = Path(importlib.import_module(PACKAGE).__file__).parent
    read = {m for path in root.rglob("*.py")
            for m in re.findall(r"conf\.(?:get|getboolean|getint|getfloat|has_option)\(\s*[\"']([a-z_]+)[\"']",
                                path.read_text())}
    registered = set(get_provider_info().get("config", {}))
    airflow_own = {s for s in read if s in conf.configuration_description and s not in registered}
    assert read - airflow_own <= registered
