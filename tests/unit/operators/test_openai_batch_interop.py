"""OpenAIBatchOperator against the local server as OpenAI and as Azure: each service gets the url form it
documents, and every upload and output carries an expiry."""

from __future__ import annotations

import json
from datetime import timedelta
from types import SimpleNamespace

import orjson
import pytest
from openai import OpenAI

from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator

THIRTY_DAYS = 30 * 86400


def context(run_id: str = "manual__1") -> dict:
    ti = SimpleNamespace(dag_id="d", task_id="t", run_id=run_id, map_index=-1, try_number=1,
                         xcom_push=lambda key, value: None)
    return {"ti": ti}


def azure_form_input(path, n: int) -> str:
    """Azure's own line format (its docs and ArcticSynth write ``"url": "/chat/completions"``)."""
    with open(path, "wb") as fp:
        for i in range(n):
            fp.write(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/chat/completions",
                                   "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}))
            fp.write(b"\n")
    return str(path)


@pytest.mark.parametrize(("conn_type", "url"), [("synth_openai", "/v1/chat/completions"),
                                                ("synth_azure_openai", "/chat/completions")])
def test_each_service_gets_its_own_url_form_and_expiries(batch_server, monkeypatch, tmp_path, conn_type, url) -> None:
    if conn_type == "synth_openai":
        conn = {"conn_type": conn_type, "password": "sk-test", "host": batch_server.base_url}
    else:
        conn = {"conn_type": conn_type, "password": "az-key", "host": batch_server.azure_endpoint,
                "extra": {"api_version": "2024-10-21"}}
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", json.dumps(conn))
    op = OpenAIBatchOperator(task_id="t", input_path=azure_form_input(tmp_path / "in.jsonl", 12),
                             output_path=str(tmp_path / "out"), deferrable=False, poll_interval=0.05)
    manifest = op.execute(context())
    assert manifest["succeeded"] == 12 and manifest["endpoint"] == "/v1/chat/completions"

    client = OpenAI(base_url=batch_server.base_url, api_key="sk-test")
    [batch] = batch_server.batches()
    assert batch["endpoint"] == url, "batches.create in the service's form"
    uploaded = client.files.content(batch["input_file_id"]).text.splitlines()
    assert {json.loads(line)["url"] for line in uploaded} == {url}, "request lines in the service's form"
    for file_id in (batch["input_file_id"], batch["output_file_id"]):
        f = client.files.retrieve(file_id)
        assert f.expires_at == f.created_at + THIRTY_DAYS, f.purpose


def test_expiry_can_be_chosen_or_turned_off(server_conn, tmp_path) -> None:
    srv = server_conn
    op = OpenAIBatchOperator(task_id="t", input_path=azure_form_input(tmp_path / "in.jsonl", 2),
                             output_path=str(tmp_path / "a"), deferrable=False, poll_interval=0.05,
                             expires_after=None)
    op.execute(context())
    client = OpenAI(base_url=srv.base_url, api_key="sk-test")
    assert all(f.expires_at is None for f in client.files.list())
    op = OpenAIBatchOperator(task_id="t2", input_path=azure_form_input(tmp_path / "in2.jsonl", 2),
                             output_path=str(tmp_path / "b"), deferrable=False, poll_interval=0.05,
                             expires_after=timedelta(days=2))
    op.execute(context("manual__2"))
    dated = [f for f in client.files.list() if f.expires_at is not None]
    assert len(dated) == 2 and all(f.expires_at == f.created_at + 2 * 86400 for f in dated)
    with pytest.raises(ValueError, match="between 1 hour and 30 days"):
        OpenAIBatchOperator(task_id="x", input_path="i", output_path="o", expires_after=timedelta(days=31))


@pytest.fixture
def server_conn(batch_server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "synth_openai", "password": "sk-test", "host": batch_server.base_url}))
    return batch_server
