from __future__ import annotations

import json

import orjson
import pytest

from airflow_provider_synth.batch.split import ShardLimits


def load_dag(dag_id: str):
    from airflow_provider_synth.testing.dags import load_dag as load

    return load(dag_id)


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


def run_chat_dag(tmp_path, monkeypatch, *, n: int = 200, max_requests: int = 100, **task_attrs):
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_batch")
    task = dag.get_task("synthesize")
    task.limits = ShardLimits(max_requests=max_requests)
    task.poll_interval = 0.2
    for key, value in task_attrs.items():
        setattr(task, key, value)
    dr = dag.test(run_conf={"n_records": n})
    ti = dr.get_task_instance("synthesize")
    return dr, ti


def manifest_file(tmp_path) -> dict:
    (path,) = list(tmp_path.rglob("manifest.json"))
    return orjson.loads(path.read_bytes())


@pytest.mark.integration
def test_partial_failure_retried_then_accepted_by_max_failed_ratio(airflow_db, openai_conn, tmp_path,
                                                                   monkeypatch) -> None:
    from airflow_provider_synth.server.config import Outcome

    openai_conn.set_outcome("quiz-00001?", Outcome.error(500), times=1)      # 10 ids: fail once, then succeed
    openai_conn.set_outcome("quiz-00002[0-1]", Outcome.error(400, code="invalid_prompt"))  # 2 ids: for good
    dr, ti = run_chat_dag(tmp_path, monkeypatch, max_failed_ratio=0.05)
    assert dr.state == "success"
    m = ti.xcom_pull(task_ids="synthesize")
    assert (m["total"], m["succeeded"], m["failed"], m["missing"]) == (200, 198, 2, 0)
    assert m["rounds"] == 2 and m["error_codes"] == {"invalid_prompt": 2}
    fails = [orjson.loads(x) for x in open(m["failures_path"], "rb")]
    assert [f["custom_id"] for f in fails] == ["quiz-000020", "quiz-000021"]
    assert all(f["retryable"] is False and f["status_code"] == 400 for f in fails)
    # round 1 resubmitted only the 10 retryable requests of shard 0, never finished work
    assert openai_conn.counters["requests_processed"] == 200 + 10


@pytest.mark.integration
def test_partial_failure_over_max_failed_ratio_fails_with_counts_and_paths(airflow_db, openai_conn, tmp_path,
                                                                           monkeypatch) -> None:
    from airflow_provider_synth.server.config import Outcome

    openai_conn.set_outcome("quiz-00000?", Outcome.error(400, code="invalid_prompt"))
    dr, ti = run_chat_dag(tmp_path, monkeypatch, max_failed_ratio=0.01)
    assert dr.state == "failed"
    m = manifest_file(tmp_path)
    assert (m["succeeded"], m["failed"]) == (190, 10)
    assert len(open(m["failures_path"], "rb").read().splitlines()) == 10


@pytest.mark.integration
def test_expired_batch_keeps_partial_output_and_resubmits_only_the_rest(airflow_db, openai_conn, tmp_path,
                                                                         monkeypatch) -> None:
    openai_conn.configure(expire_after_requests=60, expire_times=1)
    dr, ti = run_chat_dag(tmp_path, monkeypatch, n=100, max_requests=100)
    assert dr.state == "success"
    m = ti.xcom_pull(task_ids="synthesize")
    assert (m["succeeded"], m["failed"], m["rounds"]) == (100, 0, 2)
    assert len(m["batch_ids"]) == 2
    assert openai_conn.counters["requests_processed"] == 100  # 60 kept + 40 resubmitted, none twice
    assert read_ids(m["results_path"]) == [f"quiz-{i:06d}" for i in range(100)]


@pytest.mark.integration
def test_task_dies_after_create_and_retry_reattaches(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    from datetime import timedelta

    from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator

    flag = tmp_path / "died-once"
    original = OpenAIBatchOperator.persist_links

    def die_once(self, context, run):
        if not flag.exists():
            flag.write_text("x")
            raise RuntimeError("worker lost between create and defer")
        return original(self, context, run)

    monkeypatch.setattr(OpenAIBatchOperator, "persist_links", die_once)
    dr, ti = run_chat_dag(tmp_path / "out", monkeypatch, retries=1, retry_delay=timedelta(seconds=0))
    assert flag.exists() and dr.state == "success"
    m = ti.xcom_pull(task_ids="synthesize")
    assert m["try_number"] == 2 and m["succeeded"] == 200
    assert openai_conn.counters["batches_created"] == 2 and openai_conn.counters["files_created"] == 2


@pytest.mark.integration
def test_bad_input_fails_before_any_upload(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator

    bad = tmp_path / "bad.jsonl"
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}
    bad.write_bytes(orjson.dumps(good) + b"\n{not json\n" + orjson.dumps(good) + b"\n"
                    + orjson.dumps({**good, "custom_id": "b", "url": "/v1/images"}) + b"\n")
    monkeypatch.setattr(OpenAIBatchOperator, "request_source", lambda self, work, endpoint: str(bad))
    raised: list[str] = []
    plan = OpenAIBatchOperator._plan

    def spy(self, context):
        try:
            return plan(self, context)
        except Exception as exc:
            raised.append(f"{type(exc).__name__}: {exc}")
            raise

    monkeypatch.setattr(OpenAIBatchOperator, "_plan", spy)
    dr, ti = run_chat_dag(tmp_path / "out", monkeypatch)
    assert dr.state == "failed"
    c = openai_conn.counters
    assert c["files_created"] == 0 and c["batches_created"] == 0
    (error,) = raised
    assert error.startswith("InvalidRequestsError: 3 invalid request(s), nothing was submitted")
    assert f"{bad}:2: malformed JSON" in error and "duplicate custom_id (first used on line 1)" in error
    assert f"{bad}:4 custom_id='b': unsupported url '/v1/images'" in error


def test_bad_input_error_names_file_line_and_custom_id(tmp_path) -> None:
    from airflow_provider_synth.batch import InvalidRequestsError, split_requests

    bad = tmp_path / "bad.jsonl"
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}
    bad.write_bytes(orjson.dumps(good) + b"\n{not json\n" + orjson.dumps(good) + b"\n")
    with pytest.raises(InvalidRequestsError) as info:
        split_requests(str(bad), lambda i: open(tmp_path / f"s{i}", "wb"))
    assert f"{bad}:2" in str(info.value) and f"{bad}:3 custom_id='a': duplicate" in str(info.value)


@pytest.mark.integration
def test_over_budget_fails_before_any_upload(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    dr, ti = run_chat_dag(tmp_path, monkeypatch, max_cost_usd=0.000001)
    assert dr.state == "failed"
    assert openai_conn.counters["files_created"] == 0 and openai_conn.counters["batches_created"] == 0


@pytest.mark.integration
def test_api_key_appears_nowhere(airflow_db, openai_conn, tmp_path, monkeypatch, capfd) -> None:
    import os
    from pathlib import Path

    secret = "sk-test-secret-key-0000"
    dr, ti = run_chat_dag(tmp_path, monkeypatch, n=50)
    assert dr.state == "success"
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err
    assert "synthesize" in out + err  # the task's log did reach the captured output
    assert secret not in json.dumps(ti.xcom_pull(task_ids="synthesize"))
    assert secret.encode() not in (tmp_path / "example_openai_batch").joinpath(
        dr.run_id, "manifest.json").read_bytes()
    home = Path(os.environ["AIRFLOW_HOME"])
    for path in home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path  # metadata DB, logs, rendered fields, triggers
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    with create_session() as session:
        kwargs = [repr(t.kwargs) for t in session.query(Trigger).all()]
    assert all(secret not in k for k in kwargs)


@pytest.mark.integration
def test_dashboard_link_is_empty_for_a_server_that_is_not_openai(airflow_db, openai_conn, tmp_path,
                                                                   monkeypatch) -> None:
    """platform.openai.com knows nothing of the local server's batches: the link is empty (the UI hides it)."""
    from airflow_provider_synth.links import OpenAIBatchLink

    dr, ti = run_chat_dag(tmp_path, monkeypatch, n=20)
    assert dr.state == "success"
    assert len(ti.xcom_pull(task_ids="synthesize")["batch_ids"]) == 1
    assert ti.xcom_pull(task_ids="synthesize", key=OpenAIBatchLink().xcom_key) == ""


@pytest.mark.integration
def test_submit_then_sensor_then_collect(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    from airflow_provider_synth.server.config import Outcome

    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    openai_conn.set_outcome("SKU-000[0-2]", Outcome.error(503), times=1)
    dag = load_dag("example_openai_batch_submit_collect")
    for task_id in ("wait", "collect"):
        dag.get_task(task_id).poll_interval = 0.2
    dr = dag.test()
    assert dr.state == "success"
    submitted = dr.get_task_instance("submit").xcom_pull(task_ids="submit")
    assert submitted["status"] == "submitted" and len(submitted["batch_ids"]) == 1
    final = dr.get_task_instance("collect").xcom_pull(task_ids="collect")
    assert final["status"] == "completed" and final["succeeded"] == 60 and final["rounds"] == 2
    assert read_ids(final["results_path"]) == [f"SKU-{i:04d}" for i in range(60)]
    assert openai_conn.counters["batches_created"] == 2  # the round of 3 retried requests, nothing else


@pytest.mark.integration
def test_prompts_are_not_stored_as_rendered_fields(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.utils.session import create_session

    dr, ti = run_chat_dag(tmp_path, monkeypatch, n=20)
    assert dr.state == "success"
    with create_session() as session:
        row = session.query(RenderedTaskInstanceFields).filter_by(
            dag_id=ti.dag_id, task_id="synthesize", run_id=dr.run_id).one()
    stored = row.rendered_fields["requests"]
    assert stored.startswith("20 record(s)") and "quiz-000000" in stored
    assert "astronomy" not in json.dumps(row.rendered_fields), "no record text in the metadata DB's rendered fields"
