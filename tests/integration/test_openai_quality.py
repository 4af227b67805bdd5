"""The quality loop end to end: example_openai_structured run with dag.test() against the local Batch API server,
with per-custom_id outcomes (cut-off answers, off-schema JSON, a transient tail)."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.batch.usage import Usage, cost_usd
from airflow_provider_synth.server.config import Outcome

ALL_IDS = [f"quiz-{i:06d}" for i in range(200)]


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag()
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


def lines(path) -> list[dict]:
    with open(path, "rb") as fp:
        return [orjson.loads(x) for x in fp if x.strip()]


def run_structured(tmp_path, monkeypatch, *, max_requests: int = 100, **checks_changes):
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_structured")
    task = dag.get_task("synthesize")
    task.limits = ShardLimits(max_requests=max_requests)
    task.poll_interval = 0.2
    task.checks = dataclasses.replace(task.checks, **checks_changes)
    dr = dag.test(run_conf={"n_records": 200})
    return dr, dr.get_task_instance("synthesize").xcom_pull(task_ids="synthesize")


def assert_each_id_once(m: dict) -> tuple[list[dict], list[dict]]:
    results, failures = lines(m["results_path"]), lines(m["failures_path"])
    assert [r["custom_id"] for r in results] == sorted(r["custom_id"] for r in results)  # input order
    assert sorted([r["custom_id"] for r in results] + [f["custom_id"] for f in failures]) == ALL_IDS
    assert m["succeeded"] + m["failed"] + m["missing"] == m["total"] == 200
    return results, failures


@pytest.mark.integration
def test_cut_off_answers_are_retried_alone_with_more_tokens(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    openai_conn.set_outcome("quiz-00001?", Outcome.truncated(), times=1)  # 10% of the first attempts
    openai_conn.set_outcome("quiz-00012?", Outcome.truncated(), times=1)
    dr, m = run_structured(tmp_path, monkeypatch, direct_tail=0)
    assert dr.state == "success"
    results, failures = assert_each_id_once(m)
    assert failures == [] and len(results) == 200
    assert all(r["response"]["body"]["choices"][0]["finish_reason"] == "stop" for r in results)
    assert all(set(r["parsed"]) == {"question", "answer", "difficulty"} for r in results)
    c = m["checks"]
    assert (c["truncated"], c["refused"], c["schema_invalid"], c["retried"], c["rounds"]) == (20, 0, 0, 20, 1)
    assert m["rounds"] == 2 and "direct_requests" not in m
    # only the 20 cut-off requests were sent again, with the declared larger max_completion_tokens
    assert openai_conn.counters["requests_processed"] == 220
    retry_inputs = sorted(tmp_path.rglob("shard-*-r1.jsonl"))
    retried = [orjson.loads(x) for p in retry_inputs for x in p.read_bytes().splitlines()]
    assert sorted(r["custom_id"] for r in retried) == [f"quiz-0000{i}{j}" for i in (1,) for j in range(10)] + \
        [f"quiz-00012{j}" for j in range(10)]
    assert {r["body"]["max_completion_tokens"] for r in retried} == {1200}
    # billed: 200 usable answers and the 20 cut-off ones, nothing else; the manifest says what the cut-offs cost
    assert m["usage"]["requests"] == 200 and c["usage"]["requests"] == 20 and c["usage"]["completion_tokens"] > 0
    billed = Usage.from_dict(m["usage"]).add(Usage.from_dict(c["usage"]))
    assert m["cost_usd"] == cost_usd(billed, "gpt-4o-mini") and 0 < c["cost_usd"] < m["cost_usd"]
    assert 0.5 < m["input_tokens_ratio"] < 2.0


@pytest.mark.integration
def test_off_schema_json_is_retried_then_reported_with_its_text(airflow_db, openai_conn, tmp_path,
                                                                monkeypatch) -> None:
    bad = '{"question": "What is 2+2?", "answer": 4}'  # answer not a string, difficulty missing
    openai_conn.set_outcome("quiz-00000[0-2]", Outcome.success(content=bad))          # stays invalid
    openai_conn.set_outcome("quiz-00000[3-9]", Outcome.success(content="Sure!"), times=1)  # fixed on retry
    dr, m = run_structured(tmp_path, monkeypatch, direct_tail=0)
    assert dr.state == "success"  # 3 of 200 failed: within max_failed_ratio=0.02
    results, failures = assert_each_id_once(m)
    assert [f["custom_id"] for f in failures] == ["quiz-000000", "quiz-000001", "quiz-000002"]
    for f in failures:
        assert f["error"]["code"] == "schema_invalid" and "QuizItem" in f["error"]["message"]
        assert f["text"] == bad and f["attempts"] == 3 and f["status_code"] == 200
    c = m["checks"]
    assert c["schema_invalid"] == 3 * 3 + 7 and c["retried"] == 3 * 2 + 7 and c["rounds"] == 2
    assert m["rounds"] == 3 and m["error_codes"] == {"schema_invalid": 3}
    assert openai_conn.counters["requests_processed"] == 200 + 10 + 3


@pytest.mark.integration
def test_transient_tail_goes_direct_after_one_batch(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    openai_conn.set_outcome("quiz-00000[0-3]", Outcome.error(500), times=1)  # a 2% transient tail
    dr, m = run_structured(tmp_path, monkeypatch, max_requests=200)
    assert dr.state == "success"
    results, failures = assert_each_id_once(m)
    assert failures == [] and len(results) == 200
    # one batch, then the 4 failed requests through the synchronous API: no second batch, no 24 h wait
    assert openai_conn.counters["batches_created"] == 1 and len(m["batch_ids"]) == 1
    assert openai_conn.counters["direct_requests"] == 4 and openai_conn.counters["requests_processed"] == 200
    assert m["direct_requests"] == 4 and m["direct_rounds"] == 1 and m["direct_usage"]["requests"] == 4
    assert m["rounds"] == 2  # round 0 in a batch, round 1 direct
    direct_cost = cost_usd(Usage.from_dict(m["direct_usage"]), "gpt-4o-mini", batch=False)
    assert m["direct_cost_usd"] == direct_cost > 0
    # usage holds every result; the 4 direct ones are billed at the direct price, the other 196 at the batch price
    batch_usage = Usage(**{k: v - m["direct_usage"][k] for k, v in m["usage"].items()})
    assert m["cost_usd"] == pytest.approx(cost_usd(batch_usage, "gpt-4o-mini") + direct_cost, abs=2e-6)
    assert {r["custom_id"] for r in results if r["response"]["request_id"].startswith("chatcmpl-")} == {
        "quiz-000000", "quiz-000001", "quiz-000002", "quiz-000003"}


@pytest.mark.integration
def test_direct_tail_is_refused_when_max_cost_usd_leaves_no_room(airflow_db, openai_conn, tmp_path,
                                                                  monkeypatch) -> None:
    openai_conn.set_outcome("quiz-00000[0-3]", Outcome.error(500), times=1)
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_structured")
    task = dag.get_task("synthesize")
    task.limits, task.poll_interval = ShardLimits(max_requests=200), 0.2
    dr = dag.test(run_conf={"n_records": 200})
    m = dr.get_task_instance("synthesize").xcom_pull(task_ids="synthesize")
    est = m["est_cost_usd"]
    # the same run, with a budget that leaves room for the 4 requests' retry at the batch price (each round is
    # estimated against max_cost_usd before it is paid) but not at the direct price: the retry goes in a batch
    for folder, budget, succeeded, batches in (("room", est * (1 + 1.5 * 4 / 200), 200, 2),
                                               # just over round 0's estimate: no retry round fits at all
                                               ("tight", est * 1.0001, 196, 1)):
        openai_conn.reset()
        openai_conn.set_outcome("quiz-00000[0-3]", Outcome.error(500), times=1)
        monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path / folder))
        dag = load_dag("example_openai_structured")
        task = dag.get_task("synthesize")
        task.limits, task.poll_interval, task.max_cost_usd = ShardLimits(max_requests=200), 0.2, budget
        dr = dag.test(run_conf={"n_records": 200})
        m = dr.get_task_instance("synthesize").xcom_pull(task_ids="synthesize")
        assert dr.state == "success" and m["succeeded"] == succeeded, folder  # 4 of 200 within max_failed_ratio
        assert openai_conn.counters["direct_requests"] == 0, folder
        assert openai_conn.counters["batches_created"] == batches, folder
        assert "direct_requests" not in m


@pytest.mark.integration
def test_azure_direct_tail_through_the_deployment(airflow_db, batch_server_factory, monkeypatch, tmp_path) -> None:
    from airflow.models.connection import Connection

    from airflow_provider_synth.batch.checks import OutputChecks

    server = batch_server_factory(api_key="azure-key-1")
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_AZURE_OPENAI_DEFAULT", Connection(
        conn_id="synth_azure_openai_default", conn_type="synth_azure_openai", host=server.azure_endpoint,
        password="azure-key-1", extra='{"api_version": "2025-04-01-preview"}').as_json())
    server.set_outcome("review-0000[0-2]", Outcome.error(500), times=1)
    server.set_outcome("review-0000[3-4]", Outcome.truncated(), times=1)
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_azure_openai_batch")
    task = dag.get_task("synthesize")
    task.poll_interval, task.checks = 0.2, OutputChecks(finish_reasons={"length"}, direct_tail=5)
    dr = dag.test(run_conf={"n_records": 60})
    m = dr.get_task_instance("synthesize").xcom_pull(task_ids="synthesize")
    assert dr.state == "success" and (m["succeeded"], m["failed"]) == (60, 0)
    assert server.counters["batches_created"] == 1 and m["direct_requests"] == 5
    routes = server.counters["http_requests"]
    assert routes["POST /openai/deployments/{deployment}/{endpoint}"] == 5 and not [r for r in routes if "/v1/" in r]
    assert m["checks"]["truncated"] == 2 and m["checks"]["retried"] == 2
    price = (0.15, 0.075, 0.60)  # the example's prices= for its deployment, direct
    assert m["direct_cost_usd"] == cost_usd(Usage.from_dict(m["direct_usage"]), "gpt-4o-mini-batch",
                                            {"gpt-4o-mini-batch": price}, batch=False) > 0
