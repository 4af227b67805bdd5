"""The vLLM example DAGs under ``dag.test()`` with the fake engine (the real engine: test_vllm_engine.py)."""

from __future__ import annotations

from pathlib import Path

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


def describe_tis(dr) -> list:
    return sorted((t for t in dr.get_task_instances() if t.task_id == "describe"), key=lambda t: t.map_index)


@pytest.mark.integration
def test_mapped_task_with_one_output_folder_fails_loudly_and_loses_nothing(airflow_db, tmp_path, monkeypatch,
                                                                           capfd) -> None:
    """Every map index given the same folder: the first one's run lands intact, the next one fails before its
    engine starts, naming both task instances; a later DAG run may reuse the folder."""
    monkeypatch.setenv("SYNTH_VLLM_PYTHON", write_fake_python(tmp_path / "vllm-python"))
    dag = load_dag("example_vllm_batch_taskflow")
    shared = tmp_path / "shared"
    dag.get_task("describe").partial_kwargs["output_path"] = str(shared)  # no {{ ti.map_index }}
    dr = dag.test(run_conf={"colours": ["red", "navy"], "per_colour": 10})
    assert dr.state == "failed"
    states = {ti.map_index: ti.state for ti in describe_tis(dr)}
    assert sorted(states.values()) == ["failed", "success"], states
    (won,) = [ti for ti in describe_tis(dr) if ti.state == "success"]
    (lost,) = [ti for ti in describe_tis(dr) if ti.state == "failed"]
    assert lost.try_number == 1  # no retry: it would meet the same claim
    colour = ("red", "navy")[won.map_index]
    m = won.xcom_pull(task_ids="describe", map_indexes=won.map_index)
    assert m["output_dir"] == str(shared) and m["map_index"] == won.map_index
    assert orjson.loads((shared / "manifest.json").read_bytes())["map_index"] == won.map_index
    assert read_ids(m["results_path"]) == [f"{colour}-{i:04d}" for i in range(10)]  # intact, nobody overwrote it
    assert read_ids(shared / "_work" / "requests.jsonl") == [f"{colour}-{i:04d}" for i in range(10)]
    assert sorted(read_ids(shared / "_vllm" / "engine-output.jsonl")) == [f"{colour}-{i:04d}" for i in range(10)]
    assert lost.xcom_pull(task_ids="describe", map_indexes=lost.map_index) is None
    message = next(line for line in capfd.readouterr().out.splitlines() if "already claimed" in line)
    assert f"task_id=describe map_index={won.map_index} (try 1" in message
    assert f"(task_id=describe map_index={lost.map_index})" in message and "{{ ti.map_index }}" in message

    # another DAG run reusing the folder is the user's choice: not refused
    dr2 = dag.test(run_conf={"colours": ["navy"], "per_colour": 5})
    assert dr2.state == "success"
    assert read_ids(shared / "results.jsonl") == [f"navy-{i:04d}" for i in range(5)]


@pytest.mark.integration
def test_mapped_task_with_map_index_in_the_path_succeeds_and_a_retry_reclaims(airflow_db, tmp_path,
                                                                              monkeypatch) -> None:
    from datetime import timedelta

    from airflow_provider_synth.operators.vllm import VLLMBatchOperator

    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("SYNTH_VLLM_PYTHON", write_fake_python(tmp_path / "vllm-python"))
    original = VLLMBatchOperator.finish_run
    failed: list[int] = []

    def fail_once(self, context, *args):  # map index 1 dies after its engine ran (its claim is written)
        if context["ti"].map_index == 1 and not failed:
            failed.append(context["ti"].try_number)
            raise RuntimeError("worker lost after the engine finished")
        return original(self, context, *args)

    monkeypatch.setattr(VLLMBatchOperator, "finish_run", fail_once)
    dag = load_dag("example_vllm_batch_taskflow")
    describe = dag.get_task("describe")
    assert "{{ ti.map_index }}" in describe.partial_kwargs["output_path"]
    describe.partial_kwargs.update(retries=1, retry_delay=timedelta(seconds=0))
    dr = dag.test(run_conf={"colours": ["red", "navy"], "per_colour": 10})
    assert dr.state == "success" and failed == [1]
    assert [(ti.map_index, ti.try_number) for ti in describe_tis(dr)] == [(0, 1), (1, 2)]
    for colour, ti in zip(("red", "navy"), describe_tis(dr), strict=True):
        m = ti.xcom_pull(task_ids="describe", map_indexes=ti.map_index)
        assert m["output_dir"].endswith(f"/{ti.map_index}") and m["try_number"] == ti.try_number
        assert read_ids(m["results_path"]) == [f"{colour}-{i:04d}" for i in range(10)]
        claim = next(Path(m["output_dir"], "_claims").rglob("*.json"))
        assert orjson.loads(claim.read_bytes())["try_number"] == ti.try_number  # the retry claimed again
