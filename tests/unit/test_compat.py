"""Each workaround in ``_compat`` still works against the installed openai, snowflake provider and Airflow.

A release that moves what one of them relies on fails here first, with the workaround's name in the test.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import airflow_provider_synth
from airflow_provider_synth import _compat

PACKAGE = Path(airflow_provider_synth.__file__).parent


def _backend_names() -> list[str]:
    from airflow.sdk.execution_time.supervisor import ensure_secrets_backend_loaded

    return [type(b).__name__ for b in ensure_secrets_backend_loaded()]


def test_metastore_connections_switches_airflow_to_the_server_secrets_chain(monkeypatch) -> None:
    monkeypatch.delenv("_AIRFLOW_PROCESS_CONTEXT", raising=False)
    assert "MetastoreBackend" not in _backend_names()
    with _compat.metastore_connections():
        assert "MetastoreBackend" in _backend_names()
    assert "_AIRFLOW_PROCESS_CONTEXT" not in os.environ


def test_metastore_connections_keeps_a_context_already_set(monkeypatch) -> None:
    monkeypatch.setenv("_AIRFLOW_PROCESS_CONTEXT", "client")
    with _compat.metastore_connections():
        assert os.environ["_AIRFLOW_PROCESS_CONTEXT"] == "client"
    assert os.environ["_AIRFLOW_PROCESS_CONTEXT"] == "client"


def test_snowflake_conn_params_resolves_the_connection(monkeypatch) -> None:
    pytest.importorskip("airflow.providers.snowflake")
    from airflow.providers.snowflake.hooks.snowflake import SnowflakeHook

    monkeypatch.setenv("AIRFLOW_CONN_SF_COMPAT", '{"conn_type": "snowflake", "login": "u", "password": "p", '
                       '"schema": "S", "extra": {"account": "acct", "warehouse": "W", "database": "D"}}')
    params = _compat.snowflake_conn_params(SnowflakeHook("sf_compat"))
    assert {k: params.get(k) for k in ("account", "user", "warehouse", "database", "schema")} == {
        "account": "acct", "user": "u", "warehouse": "W", "database": "D", "schema": "S"}


def _private_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ("openai", "airflow", "snowflake") and any(p.startswith("_") for p in name.split(".")[1:]):
                found.append(name)
    return found


def test_no_private_api_outside_compat() -> None:
    """No module but ``_compat`` imports a private name of openai, Airflow or the snowflake provider."""
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        found = _private_imports(ast.parse(path.read_text()))
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert offenders == {}


#: Private names the package once used (0.1.0): only ``_compat`` may mention them.
KNOWN_PRIVATE = ("_vendor", "_rest_auth", "_get_conn_params", "_AIRFLOW_PROCESS_CONTEXT", "_provider_runtime",
                 "_api_key_provider", "_secrets_masker")


def test_known_private_names_only_in_compat() -> None:
    hits = [f"{path.relative_to(PACKAGE)}: {name}" for path in sorted(PACKAGE.rglob("*.py"))
            if path.name != "_compat.py" for name in KNOWN_PRIVATE if name in path.read_text()]
    assert hits == []


def test_jsonschema_strategy_draws_objects_on_the_installed_hypothesis() -> None:
    """hypothesis-jsonschema 0.23.1 calls ``many(...).more()``, which newer Hypothesis lacks; the adapter keeps
    every object schema drawable (nested, required, bounds), whichever of the two is installed."""
    import jsonschema
    from hypothesis import HealthCheck, given, settings

    schema = {"type": "object", "required": ["n", "items"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5},
                             "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                       "items": {"type": "object", "required": ["s"],
                                                 "properties": {"s": {"type": "string", "maxLength": 3}}}}}}
    seen = []

    @settings(max_examples=25, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_compat.jsonschema_strategy(schema))
    def check(value):
        jsonschema.validate(value, schema)
        assert all(ord(c) < 128 for item in value["items"] for c in item["s"])
        seen.append(value)

    check()
    assert len(seen) >= 10


def test_in_process_supervisor_is_recognised_and_its_missing_asend_detected() -> None:
    """``aget_connection``'s fallback keys on Airflow's in-process supervisor (``dag.test()``) lacking ``asend``:
    the names it relies on exist on this Airflow, and the detection follows the class (once Airflow adds
    ``asend`` there, the fallback stops applying by itself). The real lookup is tested end to end in
    tests/integration/test_stored_connections.py."""
    from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms, set_supervisor_comms

    assert not _compat.in_process_supervisor() and not _compat._comms_without_async_send()
    comms = object.__new__(InProcessSupervisorComms)
    with set_supervisor_comms(comms):
        assert _compat.in_process_supervisor()
        assert _compat._comms_without_async_send() == (not callable(getattr(InProcessSupervisorComms, "asend", None)))
    assert not _compat.in_process_supervisor()
