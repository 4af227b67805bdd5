"""Airflow-native features under real ``dag.test()``: TaskFlow decorators (with dynamic task mapping), asset
events carrying the manifest, and the asset-scheduled judge pipeline, against the local Batch API server."""

from __future__ import annotations

import orjson
import pytest

pytestmark = pytest.mark.integration


def load_dag(dag_id: str):
    from airflow_provider_synth.testing.dags import load_dag as load

    return load(dag_id)


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


def test_taskflow_openai_batch_with_one_folder_for_every_topic_fails_before_paying_twice(
        airflow_db, openai_conn, tmp_path, monkeypatch, capfd) -> None:
    """``output_path`` without ``{{ ti.map_index }}``: the first map index's run lands intact; the next one fails
    naming both task instances, before uploading anything; a later DAG run may reuse the folder."""
    dag = load_dag("example_openai_batch_taskflow")
    quiz = dag.get_task("quiz")
    shared = tmp_path / "shared"
    quiz.partial_kwargs.update(output_path=str(shared), poll_interval=0.2)
    dr = dag.test(run_conf={"topics": ["chess", "jazz"], "per_topic": 12})
    assert dr.state == "failed"
    tis = [ti for ti in dr.get_task_instances() if ti.task_id == "quiz"]
    (won,) = [ti for ti in tis if ti.state == "success"]
    (lost,) = [ti for ti in tis if ti.state == "failed"]
    topic = ("chess", "jazz")[won.map_index]
    m = won.xcom_pull(task_ids="quiz", map_indexes=won.map_index)
    assert (m["output_dir"], m["map_index"], m["succeeded"]) == (str(shared), won.map_index, 12)
    assert orjson.loads((shared / "manifest.json").read_bytes())["idempotency_key"] == m["idempotency_key"]
    assert read_ids(shared / "results.jsonl") == [f"{topic}-{i:04d}" for i in range(12)]
    assert read_ids(shared / "_work" / "requests.jsonl") == [f"{topic}-{i:04d}" for i in range(12)]
    # one file, one batch, twelve requests: the refused map index uploaded and paid for nothing
    assert openai_conn.counters["files_created"] == 1 and openai_conn.counters["batches_created"] == 1
    assert openai_conn.counters["requests_processed"] == 12
    assert lost.try_number == 1 and lost.xcom_pull(task_ids="quiz", map_indexes=lost.map_index) is None
    message = next(line for line in capfd.readouterr().out.splitlines() if "already claimed" in line)
    assert f"task_id=quiz map_index={won.map_index} (try 1" in message
    assert f"(task_id=quiz map_index={lost.map_index})" in message and "{{ ti.map_index }}" in message

    dr2 = dag.test(run_conf={"topics": ["ecology"], "per_topic": 5})  # another run, same folder: not refused
    assert dr2.state == "success"
    assert read_ids(shared / "results.jsonl") == [f"ecology-{i:04d}" for i in range(5)]


def asset_events(uri: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                .filter(AssetModel.uri == uri).order_by(AssetEvent.id).all())
        return [dict(r.extra) for r in rows]


def test_asset_pipeline_generate_then_judge_and_filter(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    from airflow_provider_synth.batch.extract import iter_output

    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    producer = load_dag("example_synth_quiz_generate")
    consumer = load_dag("example_synth_quiz_curate")
    raw_uri, dataset_uri = f"file://{tmp_path}/quiz/raw", f"file://{tmp_path}/quiz/dataset"
    assert [a.uri for a in consumer.timetable.asset_condition.objects] == [raw_uri]
    producer.get_task("generate").poll_interval = 0.2
    for task_id in ("judge",):
        consumer.get_task(task_id).poll_interval = 0.2
    before = len(asset_events(raw_uri))

    dr = producer.test(run_conf={"n_records": 60})
    assert dr.state == "success"
    manifest = dr.get_task_instance("generate").xcom_pull(task_ids="generate")
    events = asset_events(raw_uri)
    assert len(events) == before + 1
    extra = events[-1]
    assert (extra["backend"], extra["total"], extra["succeeded"], extra["failed"]) == ("openai", 60, 60, 0)
    assert extra["cost_usd"] == manifest["cost_usd"] > 0 and extra["run_id"] == dr.run_id
    assert extra["usage"]["prompt_tokens"] == manifest["usage"]["prompt_tokens"] > 0
    assert extra["results_path"] == manifest["results_path"]

    dr2 = consumer.test()
    assert dr2.state == "success", [(t.task_id, t.state) for t in dr2.get_task_instances()]
    verdicts = dr2.get_task_instance("judge").xcom_pull(task_ids="judge")
    assert verdicts["total"] == 60 and verdicts["succeeded"] == 60
    judged = {line["custom_id"]: line for line in iter_output(verdicts["results_path"])}
    assert list(judged) == read_ids(manifest["results_path"])  # one judge request per generated answer
    summary = dr2.get_task_instance("build_dataset").xcom_pull(task_ids="build_dataset")
    kept = [orjson.loads(x) for x in open(summary["path"], "rb")]
    assert 0 < len(kept) < 60 and summary["kept"] == len(kept)  # the judge kept some and dropped some
    assert all('"keep"' in judged[k["id"]]["response"]["body"]["choices"][0]["message"]["content"] for k in kept)
    assert summary["source_run"] == dr.run_id
    assert summary["cost_usd"] == pytest.approx(manifest["cost_usd"] + verdicts["cost_usd"])
    dataset_extra = asset_events(dataset_uri)[-1]
    assert dataset_extra["kept"] == len(kept) and dataset_extra["path"] == summary["path"]
    assert openai_conn.counters["batches_created"] == 2  # one generate batch, one judge batch
