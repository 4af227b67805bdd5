from __future__ import annotations

import json

import orjson
import pytest

from airflow_provider_synth.batch.split import ShardLimits


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag()
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


@pytest.fixture
def openai_conn(batch_server, monkeypatch):
    conn = json.dumps({"conn_type": "synth_openai", "password": "sk-test-secret-key-0000",
                       "host": batch_server.base_url})
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", conn)
    return batch_server


def read_ids(path) -> list[str]:
    with open(path, "rb") as fp:
        return [orjson.loads(x)["custom_id"] for x in fp if x.strip()]


@pytest.mark.integration
def test_chat_synthesis_1000_records_several_batches(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_batch")
    task = dag.get_task("synthesize")
    task.limits = ShardLimits(max_requests=300)
    task.poll_interval = 0.2
    dr = dag.test()
    assert dr.state == "success"
    manifest = dr.get_task_instance("synthesize").xcom_pull(task_ids="synthesize")
    assert manifest["total"] == 1000 and manifest["succeeded"] == 1000 and manifest["failed"] == 0
    assert len(manifest["batch_ids"]) == 4 and manifest["shards"] == 4
    assert read_ids(manifest["results_path"]) == [f"quiz-{i:06d}" for i in range(1000)]
    assert manifest["usage"]["prompt_tokens"] > 0 and manifest["cost_usd"] > 0
    assert openai_conn.counters["batches_created"] == 4 and openai_conn.counters["files_created"] == 4
