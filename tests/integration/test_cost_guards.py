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
