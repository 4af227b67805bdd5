"""example_anthropic_batch under dag.test(): the decorator, the Message Batches run and its trigger in-process,
the real anthropic SDK over HTTP against the local server; records -> Claude -> checked, typed rows."""

from __future__ import annotations

import json

import orjson
import pytest

pytest.importorskip("anthropic")

KEY = "sk-ant-dag-SECRET-8642"


@pytest.fixture
def anthropic_conn(batch_server, monkeypatch):
    """The default anthropic connection (the official provider's type), pointed at the local server."""
    monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_DEFAULT", json.dumps(
        {"conn_type": "anthropic", "password": KEY, "host": batch_server.url}))
    return batch_server


def run_example(tmp_path, monkeypatch, n: int, **task_attrs):
    from airflow_provider_synth.testing.dags import load_dag

    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_anthropic_batch")
    task = dag.get_task("write_copy")
    task.poll_interval = 0.2
    for key, value in task_attrs.items():
        setattr(task, key, value)
    return dag.test(run_conf={"n_records": n})


def ids(path) -> list[str]:
    with open(path, "rb") as fp:
        return [orjson.loads(x)["custom_id"] for x in fp if x.strip()]


@pytest.mark.integration
def test_records_to_claude_to_checked_typed_rows(airflow_db, anthropic_conn, tmp_path, monkeypatch) -> None:
    dr = run_example(tmp_path, monkeypatch, 40)
    assert dr.state == "success"
    manifest = dr.get_task_instance("write_copy").xcom_pull(task_ids="write_copy")
    assert manifest["backend"] == "anthropic" and (manifest["total"], manifest["succeeded"]) == (40, 40)
    # the records' own ids (with a space, which Anthropic refuses), in input order
    assert ids(manifest["results_path"]) == [f"SKU {i:05d}" for i in range(40)]
    assert manifest["translation"]["mapped_ids"] == 40
    assert dr.get_task_instance("typed_rows").xcom_pull(task_ids="typed_rows") == 40
    row = orjson.loads(open(manifest["results_path"], "rb").readline())
    assert row["response"]["body"]["type"] == "message" and set(row["parsed"]) == {"headline", "description", "tags"}
    # the estimate (before submission) against what the answers report
    assert manifest["cost_usd"] > 0 and manifest["est_cost_usd"] >= manifest["cost_usd"]
    assert 0.8 < manifest["input_tokens_ratio"] < 1.25
    assert anthropic_conn.counters["message_batches_created"] == 1
    assert KEY not in json.dumps(manifest)


@pytest.mark.integration
def test_cut_off_overloaded_and_invalid_answers(airflow_db, anthropic_conn, tmp_path, monkeypatch) -> None:
    from airflow_provider_synth.runs.anthropic_messages import anthropic_custom_id
    from airflow_provider_synth.server.config import Outcome, OutcomeRule

    cut, busy, bad = (anthropic_custom_id(f"SKU {i:05d}") for i in (3, 5, 7))
    anthropic_conn.configure(outcomes=[OutcomeRule(cut, Outcome.truncated(), times=1),
                                       OutcomeRule(busy, Outcome.error(529, code="overloaded_error"), times=1),
                                       OutcomeRule(bad, Outcome.error(400, message="bad image"))])
    dr = run_example(tmp_path, monkeypatch, 20, max_failed_ratio=0.1)
    assert dr.state == "success"
    manifest = dr.get_task_instance("write_copy").xcom_pull(task_ids="write_copy")
    assert (manifest["succeeded"], manifest["failed"]) == (19, 1)
    assert manifest["checks"]["truncated"] == 1 and manifest["rounds"] == 2
    failure = orjson.loads(open(manifest["failures_path"], "rb").readline())
    assert failure["custom_id"] == "SKU 00007" and failure["error"] == {"code": "invalid_request_error",
                                                                        "message": "bad image"}
    # round 2 carried the two a retry can fix, the cut-off one with more room
    (retry,) = tmp_path.rglob("shards/shard-00000-r1.jsonl")
    sent = [orjson.loads(x) for x in retry.read_bytes().splitlines()]
    assert sorted(r["custom_id"] for r in sent) == ["SKU 00003", "SKU 00005"]
    assert {r["custom_id"]: r["params"]["max_tokens"] for r in sent} == {"SKU 00003": 1200, "SKU 00005": 400}
