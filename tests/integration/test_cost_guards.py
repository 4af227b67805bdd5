"""Money guards of issue 21 under real ``dag.test()`` against the local Batch API server: an unknown model's
price, the estimate logged against ``max_cost_usd``, usage and cost counting the same answers."""

from __future__ import annotations

import dataclasses
import json

import pytest

from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.testing.dags import load_dag

pytestmark = pytest.mark.integration


def run_chat_dag(tmp_path, monkeypatch, *, n: int = 20, config: dict | None = None, **task_attrs):
    """The example DAG on ``n`` records; ``config``: fields of its ``OpenAIBatchConfig`` to change."""
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_batch")
    task = dag.get_task("synthesize")
    task.poll_interval = 0.2
    task.config = dataclasses.replace(task.config, limits=ShardLimits(max_requests=100),
                                      **{"max_cost_usd": None, **(config or {})})
    for key, value in task_attrs.items():
        setattr(task, key, value)
    dr = dag.test(run_conf={"n_records": n})
    return dr, dr.get_task_instance("synthesize")


def test_a_model_typo_with_a_budget_fails_before_any_upload(airflow_db, openai_conn, tmp_path, monkeypatch,
                                                            capfd) -> None:
    """On the old main ``gpt-4o-mni`` was priced as gpt-4o and submitted."""
    dr, ti = run_chat_dag(tmp_path, monkeypatch, model="gpt-4o-mni", config={"max_cost_usd": 5.0})
    assert ti.state == "failed"
    log = "".join(capfd.readouterr())
    assert "model 'gpt-4o-mni' has no known price" in log and "nothing was submitted" in log
    assert openai_conn.counters["files_created"] == 0 and openai_conn.counters["batches_created"] == 0


def test_a_model_typo_without_a_budget_warns_and_reports_no_cost(airflow_db, openai_conn, tmp_path, monkeypatch,
                                                                 capfd) -> None:
    dr, ti = run_chat_dag(tmp_path, monkeypatch, model="gpt-4o-mni")
    assert ti.state == "success"
    log = "".join(capfd.readouterr())
    assert "model 'gpt-4o-mni' has no known price" in log and "cost_usd will be unknown" in log
    assert ti.xcom_pull(task_ids="synthesize")["cost_usd"] is None


def test_the_estimate_is_logged_against_the_budget_before_submission(airflow_db, openai_conn, tmp_path,
                                                                     monkeypatch, capfd) -> None:
    dr, ti = run_chat_dag(tmp_path, monkeypatch, config={"max_cost_usd": 5.0})
    assert ti.state == "success"
    log = "".join(capfd.readouterr())
    estimate = log.index("round 0: estimated cost $")  # logged while planning, before the first upload
    assert "within max_cost_usd=$5.0" in log[estimate:estimate + 300]


def test_usage_and_cost_count_the_same_answers(airflow_db, openai_conn, tmp_path, monkeypatch, caplog) -> None:
    """Answers the checks refuse are billed: the billed usage counts them with the results, as cost_usd does
    (on the old main the log read "usage {... 0 tokens}; cost $0.000085" when every answer was refused)."""
    from airflow_provider_synth.batch.checks import OutputChecks
    from airflow_provider_synth.batch.usage import Usage, cost_usd

    # every answer is refused ("stop" made unusable), and nothing is retried
    checks = OutputChecks(finish_reasons={"stop"})
    dr, ti = run_chat_dag(tmp_path, monkeypatch, n=6, checks=checks, max_failed_ratio=1.0,
                          config={"retry_failed_requests": 0})
    assert ti.state == "success"
    (path,) = tmp_path.rglob("manifest.json")
    m = json.loads(path.read_text())
    assert m["succeeded"] == 0 and m["usage"]["total_tokens"] == 0
    billed = m["billed_usage"]
    assert billed["requests"] == 6 and billed["total_tokens"] > 0
    assert m["cost_usd"] == cost_usd(Usage.from_dict(billed), "gpt-4o-mini") > 0
    assert f"billed {billed['total_tokens']:,} token(s) for 6 answer(s)" in caplog.text


# -- a systematic failure stops the bleeding; every retry round is estimated first -------------------------------

def _structured(task):
    import pydantic

    from airflow_provider_synth.batch.checks import checks_for

    class Quiz(pydantic.BaseModel):
        question: str
        answer: str

    task.template = dataclasses.replace(task.template, response_format=Quiz)
    return checks_for(None, Quiz)


def test_a_systematic_schema_failure_is_not_retried_and_fails_the_task_with_examples(
        airflow_db, openai_conn, tmp_path, monkeypatch, capfd) -> None:
    """Every answer off-schema (a broken schema or prompt): on the old main all 20 were resubmitted, twice."""
    from airflow_provider_synth.server.config import Outcome

    openai_conn.set_outcome("*", Outcome.success(content="Sure! Here is a quiz question about it."))
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_batch")
    task = dag.get_task("synthesize")
    task.poll_interval, task.max_failed_ratio = 0.2, 1.0
    task.checks = _structured(task)
    task.config = dataclasses.replace(task.config, max_cost_usd=None, retry_failed_requests=2)
    dr = dag.test(run_conf={"n_records": 20})
    assert dr.get_task_instance("synthesize").state == "failed"
    log = "".join(capfd.readouterr())
    assert "systematic failure: 20 of 20 answers in round 0 were schema_invalid" in log
    assert "examples: quiz-0000" in log and "retry_systematic=True" in log
    assert openai_conn.counters["batches_created"] == 1  # no retry round paid for
    (path,) = tmp_path.rglob("manifest.json")
    assert json.loads(path.read_text())["failed"] == 20  # the answers landed, as failures


def test_retry_systematic_retries_it_when_asked(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    from airflow_provider_synth.server.config import Outcome

    openai_conn.set_outcome("*", Outcome.success(content="not json"), times=1)  # the retry answers fit
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_batch")
    task = dag.get_task("synthesize")
    task.poll_interval = 0.2
    task.checks = dataclasses.replace(_structured(task), retry_systematic=True)
    task.config = dataclasses.replace(task.config, max_cost_usd=None, retry_failed_requests=2)
    dr = dag.test(run_conf={"n_records": 12})
    ti = dr.get_task_instance("synthesize")
    assert ti.state == "success"
    assert ti.xcom_pull(task_ids="synthesize")["succeeded"] == 12
    assert openai_conn.counters["batches_created"] == 2


def test_each_retry_round_is_estimated_against_the_budget_before_it_is_submitted(
        airflow_db, openai_conn, tmp_path, monkeypatch, caplog) -> None:
    from airflow_provider_synth.server.config import Outcome

    caplog.set_level("INFO")
    openai_conn.set_outcome("quiz-00000[0-4]", Outcome.error(500), times=1)
    dr, ti = run_chat_dag(tmp_path, monkeypatch, config={"max_cost_usd": 5.0})
    assert ti.state == "success"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("retry round [1]:"))
    assert "5 request(s) estimated at $" in line and "against max_cost_usd=$5.0" in line
    assert openai_conn.counters["batches_created"] == 2
