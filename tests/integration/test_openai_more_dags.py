"""The embeddings and Azure example DAGs under ``dag.test()``, against the local Batch API server over HTTP.

The real ``openai`` SDK (``OpenAI``, ``AzureOpenAI`` and their async twins in the in-process trigger) talks
to the server; the Azure runs go through its ``/openai/...?api-version=`` routes only.
"""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from airflow.sdk import Connection

from airflow_provider_synth.batch.split import ShardLimits

AZURE_TOKEN = "entra-token-SECRET-24680"
AZURE_KEY = "azure-key-SECRET-13579"
#: Azure's twins of the routes a batch run uses: upload, create, list (re-attach), poll, download
AZURE_ROUTES = ("POST /openai/files", "POST /openai/batches", "GET /openai/batches",
                "GET /openai/batches/{batch_id}", "GET /openai/files/{file_id}/content")
token_requests: list[str] = []


def entra_token() -> str:
    """The connection's ``azure_ad_token_provider``: what ``get_bearer_token_provider`` would return.

    Records who asked: the operator's sync client, or the trigger's async client (inside the event loop)."""
    try:
        asyncio.get_running_loop()
        token_requests.append("async")
    except RuntimeError:
        token_requests.append("sync")
    return AZURE_TOKEN


def load_dag(dag_id: str):
    from airflow_provider_synth.testing.dags import load_dag as load

    return load(dag_id)


def run_dag(dag_id: str, task_id: str, tmp_path, monkeypatch, *, run_conf=None, **task_attrs):
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag(dag_id)
    task = dag.get_task(task_id)
    task.poll_interval = 0.2
    for key, value in task_attrs.items():
        setattr(task, key, value)
    dr = dag.test(run_conf=run_conf)
    return dr, dr.get_task_instance(task_id)


def read_lines(path) -> list[dict]:
    with open(path, "rb") as fp:
        return [orjson.loads(x) for x in fp if x.strip()]


# -- embeddings -------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_embeddings_one_vector_per_input_in_input_order(airflow_db, batch_server, monkeypatch, tmp_path) -> None:
    from airflow_provider_synth.batch.extract import extract_embeddings
    from airflow_provider_synth.server.answers import embedding_vector

    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", Connection(
        conn_id="synth_openai_default", conn_type="synth_openai", password="sk-test-embed",
        host=batch_server.base_url).as_json())
    # 100 documents of 1 to 4 chunks: 250 inputs, at most 100 per batch -> several shards by input count
    dr, ti = run_dag("example_openai_embeddings", "embed", tmp_path, monkeypatch,
                     limits=ShardLimits(max_embedding_inputs=100))
    assert dr.state == "success"
    m = ti.xcom_pull(task_ids="embed")
    assert (m["total"], m["succeeded"], m["failed"], m["missing"]) == (100, 100, 0, 0)
    assert m["endpoint"] == "/v1/embeddings" and m["model"] == "text-embedding-3-small"
    assert m["shards"] == len(m["batch_ids"]) == batch_server.counters["batches_created"] >= 3
    assert m["usage"]["prompt_tokens"] > 0 and m["cost_usd"] > 0

    requests = {r["custom_id"]: r["body"]["input"] for r in read_lines(f"{m['work_dir']}/requests.jsonl")}
    results = read_lines(m["results_path"])
    assert [r["custom_id"] for r in results] == [f"doc-{i:05d}" for i in range(100)]
    vectors = 0
    for line in results:
        chunks = requests[line["custom_id"]]
        found = extract_embeddings(line)
        assert len(found) == len(chunks) == 1 + int(line["custom_id"][-5:]) % 4
        for chunk, vector in zip(chunks, found, strict=True):  # each vector is its own chunk's, in order
            assert vector == pytest.approx(embedding_vector(chunk, "text-embedding-3-small", 256).tolist(),
                                           abs=1e-6)
        vectors += len(found)
    assert vectors == 250
    assert dr.get_task_instance("report").xcom_pull(task_ids="report") == {"documents": 100, "vectors": 250}


# -- Azure -------------------------------------------------------------------------------------------------------


def azure_connection(server, **fields) -> str:
    return Connection(conn_id="synth_azure_openai_default", conn_type="synth_azure_openai",
                      host=server.azure_endpoint, **fields).as_json()


def assert_azure_routes_only(server) -> None:
    routes = server.counters["http_requests"]
    for route in AZURE_ROUTES:
        assert routes.get(route, 0) > 0, (route, routes)
    assert not [r for r in routes if " /v1/" in r], routes


def assert_azure_run(dr, ti, server, n: int) -> dict:
    assert dr.state == "success"
    m = ti.xcom_pull(task_ids="synthesize")
    assert m["backend"] == "azure_openai" and m["model"] == "gpt-4o-mini-batch"
    assert (m["total"], m["succeeded"], m["failed"], m["missing"]) == (n, n, 0, 0)
    assert m["cost_usd"] > 0  # priced with the example's prices= for the deployment
    results = read_lines(m["results_path"])
    assert [r["custom_id"] for r in results] == [f"review-{i:05d}" for i in range(n)]
    assert {r["response"]["body"]["model"] for r in results} == {"gpt-4o-mini-batch"}
    assert_azure_routes_only(server)
    return m


@pytest.mark.integration
def test_azure_with_api_key(airflow_db, batch_server_factory, monkeypatch, tmp_path, capfd) -> None:
    server = batch_server_factory(api_key=AZURE_KEY)  # anything but this key gets a 401
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_AZURE_OPENAI_DEFAULT", azure_connection(
        server, password=AZURE_KEY, extra=json.dumps({"api_version": "2025-04-01-preview"})))
    dr, ti = run_dag("example_azure_openai_batch", "synthesize", tmp_path, monkeypatch,
                     run_conf={"n_records": 150}, limits=ShardLimits(max_requests=100))
    m = assert_azure_run(dr, ti, server, 150)
    assert len(m["batch_ids"]) == 2 and server.counters["batches_created"] == 2
    out, err = capfd.readouterr()
    assert "synthesize" in out + err and AZURE_KEY not in out + err
    assert AZURE_KEY not in json.dumps(m)


@pytest.mark.integration
def test_azure_with_entra_token_provider(airflow_db, batch_server_factory, monkeypatch, tmp_path, capfd) -> None:
    server = batch_server_factory(api_key=AZURE_TOKEN)  # the bearer token is the only credential accepted
    monkeypatch.setenv("AIRFLOW__SYNTH__ALLOW_TOKEN_PROVIDER_IMPORT", "True")  # the deployment allows it
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_AZURE_OPENAI_DEFAULT", azure_connection(
        server, extra=json.dumps({"api_version": "2025-04-01-preview",
                                  "azure_ad_token_provider": f"{__name__}.entra_token"})))
    token_requests.clear()
    dr, ti = run_dag("example_azure_openai_batch", "synthesize", tmp_path, monkeypatch, run_conf={"n_records": 60})
    m = assert_azure_run(dr, ti, server, 60)
    assert len(m["batch_ids"]) == 1 and server.counters["batches_created"] == 1
    # the operator's sync client (upload, create, download) and the trigger's async client (polls) both got
    # their bearer token from the provider: no key anywhere, and the server accepts nothing else
    assert {"sync", "async"} <= set(token_requests), token_requests
    out, err = capfd.readouterr()
    assert AZURE_TOKEN not in out + err and AZURE_TOKEN not in json.dumps(m)
