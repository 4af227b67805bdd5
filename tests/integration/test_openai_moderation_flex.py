"""The OpenAI Batch API as it is today, end to end with the real SDK against the local server: /v1/moderations as a
safety filter (generate -> moderate -> keep unflagged), the flex tier for the direct tail, and the Batch object's
own usage kept beside the run's sum."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import orjson
import pytest

from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.batch.usage import Usage, cost_usd
from airflow_provider_synth.server.config import Outcome

FLAGGED = {"reply-00003": "You idiot, read the manual.", "reply-00011": "Just [flag:illicit] it."}


def load_dag(dag_id: str):
    from airflow_provider_synth.testing.dags import load_dag as load

    return load(dag_id)


def lines(path) -> list[dict]:
    with open(path, "rb") as fp:
        return [orjson.loads(x) for x in fp if x.strip()]


@pytest.mark.integration
def test_generate_moderate_keep_only_unflagged_rows(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    for cid, text in FLAGGED.items():  # the generation step writes two unsafe replies
        openai_conn.set_outcome(cid, Outcome.success(content=text))
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_moderation")
    for task_id in ("generate", "moderate"):
        dag.get_task(task_id).poll_interval = 0.2
    dr = dag.test(run_conf={"n_records": 20})
    assert dr.state == "success"
    generated = dr.get_task_instance("generate").xcom_pull(task_ids="generate")
    moderated = dr.get_task_instance("moderate").xcom_pull(task_ids="moderate")
    kept = dr.get_task_instance("keep_unflagged").xcom_pull(task_ids="keep_unflagged")
    assert moderated["total"] == moderated["succeeded"] == 20 and moderated["failed"] == 0
    assert moderated["cost_usd"] == 0.0  # moderations are free: counted, at $0
    assert kept == {"kept": 18, "flagged": 2, "unchecked": 0}
    curated = lines(Path(generated["output_dir"], "curated.jsonl"))
    assert [r["custom_id"] for r in curated] == [f"reply-{i:05d}" for i in range(20) if f"reply-{i:05d}" not in FLAGGED]
    by_id = {r["custom_id"]: r for r in lines(moderated["results_path"])}
    harassment = by_id["reply-00003"]["response"]["body"]["results"][0]
    assert harassment["flagged"] and harassment["categories"]["harassment"]
    assert by_id["reply-00011"]["response"]["body"]["results"][0]["categories"]["illicit"]
    assert openai_conn.counters["batches_created"] == 2


def run_structured(tmp_path, monkeypatch, **checks_changes):
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    dag = load_dag("example_openai_structured")
    task = dag.get_task("synthesize")
    task.limits, task.poll_interval = ShardLimits(max_requests=200), 0.2
    task.checks = dataclasses.replace(task.checks, **checks_changes)
    dr = dag.test(run_conf={"n_records": 200})
    return dr, dr.get_task_instance("synthesize").xcom_pull(task_ids="synthesize")


@pytest.mark.integration
def test_flex_tail_is_billed_at_batch_prices(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    openai_conn.set_outcome("quiz-00000[0-3]", Outcome.error(500), times=1)
    dr, m = run_structured(tmp_path, monkeypatch, direct_service_tier="flex")
    assert dr.state == "success" and m["succeeded"] == 200
    assert openai_conn.counters["batches_created"] == 1 and openai_conn.counters["direct_requests_flex"] == 4
    assert m["direct_tiers"] == {"flex": 4}
    assert m["direct_cost_usd"] == cost_usd(Usage.from_dict(m["direct_usage"]), "gpt-4o-mini", batch=True) > 0
    # the whole run at the batch price: 196 batch answers and 4 flex ones
    assert m["cost_usd"] == pytest.approx(cost_usd(Usage.from_dict(m["usage"]), "gpt-4o-mini"), abs=2e-6)


@pytest.mark.integration
def test_flex_without_capacity_falls_back_only_when_allowed(airflow_db, batch_server_factory, tmp_path,
                                                            monkeypatch) -> None:
    server = batch_server_factory(flex_unavailable=("quiz-00000[0-1]",))
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "synth_openai", "password": "sk-flex", "host": server.base_url,
         "extra": {"max_retries": 0}}))
    server.set_outcome("quiz-00000[0-3]", Outcome.error(500), times=1)
    dr, m = run_structured(tmp_path / "strict", monkeypatch, direct_service_tier="flex")
    # no fallback: the two requests flex never has room for fail as retryable 429s, round after round
    assert m["succeeded"] == 198 and m["error_codes"] == {"flex_resource_unavailable": 2}
    failures = lines(m["failures_path"])
    assert {f["custom_id"] for f in failures} == {"quiz-000000", "quiz-000001"}
    assert all(f["status_code"] == 429 and f["retryable"] for f in failures)
    assert m["direct_tiers"] == {"flex": 2}

    server.reset()
    server.set_outcome("quiz-00000[0-3]", Outcome.error(500), times=1)
    dr, m = run_structured(tmp_path / "fallback", monkeypatch, direct_service_tier="flex",
                           direct_tier_fallback=True)
    assert dr.state == "success" and m["succeeded"] == 200
    assert m["direct_tiers"] == {"default": 2, "flex": 2}
    assert tail_cost(m, "gpt-4o-mini") == pytest.approx(m["direct_cost_usd"], abs=2e-6)


def tail_cost(m: dict, model: str) -> float:
    """What the tail should cost: the answers at the default tier at the direct price, flex at the batch price
    (each answer names its tier)."""
    by_tier: dict[str, Usage] = {}
    for path in sorted(Path(m["output_dir"], "_work", "outputs").glob("*-direct-*.jsonl")):
        for line in lines(path):
            body = (line.get("response") or {}).get("body") or {}
            if line.get("response", {}).get("status_code") == 200:
                by_tier.setdefault(body.get("service_tier", "default"), Usage()).add_usage(body.get("usage"))
    return sum(cost_usd(u, model, batch=tier == "flex") or 0.0 for tier, u in by_tier.items())


@pytest.mark.integration
def test_service_usage_is_kept_beside_the_runs_own_sum(airflow_db, openai_conn, tmp_path, monkeypatch) -> None:
    dr, m = run_structured(tmp_path, monkeypatch, direct_tail=0)
    assert dr.state == "success"
    own = m["usage"]
    assert m["service_usage"]["prompt_tokens"] == own["prompt_tokens"] > 0
    assert m["service_usage"]["completion_tokens"] == own["completion_tokens"] > 0
    assert m["service_model"] == "gpt-4o-mini" and "usage_mismatch" not in m


def test_a_usage_mismatch_is_reported() -> None:
    from airflow_provider_synth.batch.usage import usage_mismatch

    own = Usage(prompt_tokens=1000, completion_tokens=500)
    assert usage_mismatch(own, Usage(prompt_tokens=1010, completion_tokens=505)) is None  # within 3%
    assert usage_mismatch(own, Usage(prompt_tokens=1200, completion_tokens=500)) == {
        "prompt_tokens": {"run": 1000, "service": 1200}}
