"""A connection may name code to import (``azure_ad_token_provider``) only where airflow.cfg allows it."""

from __future__ import annotations

import json
import sys

import pytest

from airflow_provider_synth.exceptions import ConnectionConfigError
from airflow_provider_synth.get_provider_info import get_provider_info
from airflow_provider_synth.hooks.openai import OpenAIBatchAsyncHook, OpenAIBatchHook

MODULE = "synth_token_gate_probe"


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A module whose import is visible: importing it is what the gate must prevent."""
    (tmp_path / f"{MODULE}.py").write_text("IMPORTED = True\n\ndef token():\n    return 'entra-token'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AZ", json.dumps({
        "conn_type": "synth_azure_openai", "host": "https://r.openai.azure.com",
        "extra": {"api_version": "2024-10-21", "azure_ad_token_provider": f"{MODULE}.token"}}))
    yield
    sys.modules.pop(MODULE, None)


@pytest.mark.parametrize("hook_cls", [OpenAIBatchHook, OpenAIBatchAsyncHook])
def test_token_provider_is_not_imported_by_default(probe, monkeypatch, hook_cls) -> None:
    monkeypatch.delenv("AIRFLOW__SYNTH__ALLOW_TOKEN_PROVIDER_IMPORT", raising=False)
    conn = OpenAIBatchHook.get_connection("az")
    with pytest.raises(ConnectionConfigError, match=r"\[synth\] allow_token_provider_import = True"):
        hook_cls("az")._client_kwargs(conn, conn.extra_dejson)
    assert MODULE not in sys.modules, "nothing named by the connection was imported"


def test_token_provider_is_imported_where_the_deployment_allows_it(probe, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW__SYNTH__ALLOW_TOKEN_PROVIDER_IMPORT", "True")
    conn = OpenAIBatchHook.get_connection("az")
    kwargs = OpenAIBatchHook("az")._client_kwargs(conn, conn.extra_dejson)
    assert kwargs["azure_ad_token_provider"]() == "entra-token" and MODULE in sys.modules


def test_the_option_is_registered_off_by_default() -> None:
    option = get_provider_info()["config"]["synth"]["options"]["allow_token_provider_import"]
    assert option["type"] == "boolean" and option["default"] == "False"
