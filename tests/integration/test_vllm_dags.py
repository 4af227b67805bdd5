"""The vLLM example DAGs under ``dag.test()`` with the fake engine (the real engine: test_vllm_engine.py)."""

from __future__ import annotations

import orjson
import pytest

from airflow_provider_synth.testing.vllm import write_fake_python


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag()
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


def read_ids(path: str) -> list[str]:
    with open(path, "rb") as fp:
        return [orjson.loads(x)["custom_id"] for x in fp if x.strip()]


@pytest.mark.integration
def test_data_parallel_dag_splits_expands_and_merges(airflow_db, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("SYNTH_VLLM_SHARD_SIZE", "300")
    monkeypatch.setenv("SYNTH_VLLM_PYTHON", write_fake_python(tmp_path / "vllm-python"))
    dag = load_dag("example_vllm_data_parallel")
    task = dag.get_task("synthesize")
    assert task.partial_kwargs["queue"] == "gpu"  # not the KubernetesExecutor here: the Celery queue
    dr = dag.test(run_conf={"n_records": 1000})
    assert dr.state == "success"
    merged = dr.get_task_instance("merge").xcom_pull(task_ids="merge")
    assert merged["shards"] == 4 and merged["total"] == 1000 and merged["succeeded"] == 1000
    assert merged["usage"]["requests"] == 1000 and merged["usage"]["completion_tokens"] > 0
    assert read_ids(merged["results_path"]) == [f"fact-{i:06d}" for i in range(1000)]
