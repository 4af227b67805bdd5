"""Airflow-native features under real ``dag.test()``: TaskFlow decorators (with dynamic task mapping), asset
events carrying the manifest, and the asset-scheduled judge pipeline, against the local Batch API server."""

from __future__ import annotations

import orjson
import pytest

pytestmark = pytest.mark.integration


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag()
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


def read_ids(path) -> list[str]:
    with open(path, "rb") as fp:
        return [orjson.loads(x)["custom_id"] for x in fp if x.strip()]


def test_taskflow_openai_batch_expands_one_run_per_topic(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_batch_taskflow")
    quiz = dag.get_task("quiz")
    assert type(quiz).__name__ == "DecoratedMappedOperator"
    assert quiz.operator_class.custom_operator_name == "@task.synth_openai_batch"
    quiz.partial_kwargs["poll_interval"] = 0.2
    dr = dag.test(run_conf={"topics": ["chess", "jazz", "ecology"], "per_topic": 40})
    assert dr.state == "success"
    manifests = [ti.xcom_pull(task_ids="quiz", map_indexes=ti.map_index)
                 for ti in sorted(dr.get_task_instances(), key=lambda t: t.map_index) if ti.task_id == "quiz"]
    assert [m["map_index"] for m in manifests] == [0, 1, 2]
    for topic, m in zip(("chess", "jazz", "ecology"), manifests, strict=True):
        assert (m["backend"], m["total"], m["succeeded"], m["failed"]) == ("openai", 40, 40, 0)
        assert m["output_dir"] == str(tmp_path / "example_openai_batch_taskflow" / dr.run_id / str(m["map_index"]))
        assert read_ids(m["results_path"]) == [f"{topic}-{i:04d}" for i in range(40)]
        assert m["cost_usd"] > 0 and m["usage"]["prompt_tokens"] > 0
    # three separate runs, each with its own idempotency key: one file and one batch each
    assert len({m["idempotency_key"] for m in manifests}) == 3
    assert openai_conn.counters["batches_created"] == 3 and openai_conn.counters["requests_processed"] == 120
    report = dr.get_task_instance("report").xcom_pull(task_ids="report")
    assert report["total"] == 120 and report["runs"] == 3
