"""The vLLM example DAGs under ``dag.test()`` with the fake engine (the real engine: test_vllm_engine.py)."""

from __future__ import annotations

import orjson
import pytest

from airflow_provider_synth.testing.vllm import write_fake_python


def load_dag(dag_id: str):
    from airflow_provider_synth.testing.dags import load_dag as load

    return load(dag_id)


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


@pytest.mark.integration
def test_taskflow_vllm_decorator_expands_over_colours(airflow_db, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("SYNTH_VLLM_PYTHON", write_fake_python(tmp_path / "vllm-python"))
    dag = load_dag("example_vllm_batch_taskflow")
    assert dag.get_task("describe").operator_class.custom_operator_name == "@task.synth_vllm_batch"
    dr = dag.test(run_conf={"colours": ["red", "navy"], "per_colour": 30})
    assert dr.state == "success"
    tis = sorted((t for t in dr.get_task_instances() if t.task_id == "describe"), key=lambda t: t.map_index)
    for colour, ti in zip(("red", "navy"), tis, strict=True):
        m = ti.xcom_pull(task_ids="describe", map_indexes=ti.map_index)
        assert (m["backend"], m["total"], m["succeeded"], m["map_index"]) == ("vllm", 30, 30, ti.map_index)
        assert read_ids(m["results_path"]) == [f"{colour}-{i:04d}" for i in range(30)]
        requests = [orjson.loads(x) for x in open(f"{m['output_dir']}/_work/requests.jsonl", "rb")]
        assert requests[0]["body"]["messages"][0]["content"] == "You write one-sentence product descriptions."
        assert requests[0]["body"]["messages"][1]["content"] == f"Describe a {colour} umbrella."
        first = orjson.loads(open(m["results_path"], "rb").readline())
        assert first["response"]["body"]["choices"][0]["message"]["content"].endswith(f"Describe a {colour} umbrella.")
    assert dr.get_task_instance("report").xcom_pull(task_ids="report") == 60
