"""OpenAIBatchOperator with output checks and the direct-API tail: a task that dies mid-tail is resumed by its
retry without a new batch and without paying twice for a recorded answer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import orjson
import pytest

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator, RequestTemplate
from airflow_provider_synth.runs import openai_direct
from airflow_provider_synth.server.config import Outcome


def context(try_number: int = 1) -> dict:
    return {"ti": SimpleNamespace(dag_id="d", task_id="t", run_id="manual__1", map_index=-1,
                                  try_number=try_number, xcom_push=lambda *a, **k: None)}


@pytest.fixture
def server(batch_server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "synth_openai", "password": "sk-x", "host": batch_server.base_url,
         "extra": {"max_retries": 0}}))
    return batch_server


def make_op(tmp_path, checks: OutputChecks | None) -> OpenAIBatchOperator:
    records = [{"id": f"r{i}", "topic": f"t{i}"} for i in range(10)]
    return OpenAIBatchOperator(task_id="t", requests=records, model="gpt-4o-mini", output_path=str(tmp_path),
                               template=RequestTemplate(prompt_template="About {topic}", id_field="id"),
                               poll_interval=0.05, limits=ShardLimits(max_requests=4), deferrable=False,
                               checks=checks)


def test_a_task_that_dies_mid_tail_is_finished_by_its_retry(server, tmp_path, monkeypatch) -> None:
    server.set_outcome("r[1-5]", Outcome.error(500), times=1)
    monkeypatch.setattr(openai_direct, "PART_LINES", 1)
    real, calls = OpenAIBatchHook.create_direct, []

    def dies_on_the_third(self, url, body, *, custom_id=None):
        calls.append(custom_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the worker is killed
        return real(self, url, body, custom_id=custom_id)

    monkeypatch.setattr(OpenAIBatchHook, "create_direct", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        make_op(tmp_path, OutputChecks(direct_tail=10, direct_concurrency=1)).execute(context())
    monkeypatch.setattr(OpenAIBatchHook, "create_direct", real)
    paid = server.counters["direct_requests"]
    assert 2 <= paid <= 3 and server.counters["batches_created"] == 3
    # the retry runs with the tail turned off: the interrupted direct round is still finished directly
    m = make_op(tmp_path, None).execute(context(try_number=2))
    assert (m["succeeded"], m["failed"], m["total"]) == (10, 0, 10)
    assert server.counters["batches_created"] == 3  # no retry batch
    assert server.counters["direct_requests"] == paid + 5 - 2  # the two recorded answers are never asked again
    assert m["direct_requests"] == 5 and m["direct_rounds"] == 2 and "checks" not in m  # shards 0 and 1
    results = [orjson.loads(x) for x in open(m["results_path"], "rb")]
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(10)]


def test_the_plan_keeps_the_checks_for_a_cli_re_merge(server, tmp_path, capsys) -> None:
    from airflow_provider_synth.cli import EXIT_OK, main

    server.set_outcome("r[12]", Outcome.truncated())
    checks = OutputChecks(finish_reasons={"length"}, retry=False)
    op = make_op(tmp_path, checks)
    op.max_failed_ratio = 0.5
    m = op.execute(context())
    assert (m["succeeded"], m["failed"], m["checks"]["truncated"]) == (8, 2, 2)
    assert server.counters["batches_created"] == 3  # retry=False: reported, not retried
    dest = tmp_path / "landed"
    capsys.readouterr()
    assert main(["--json", "download", str(tmp_path), "--output", str(dest)]) == EXIT_OK
    landed = orjson.loads(capsys.readouterr().out)
    assert (landed["succeeded"], landed["failed"], landed["checks"]["truncated"]) == (8, 2, 2)
    assert landed["cost_usd"] == m["cost_usd"] and landed["checks"]["cost_usd"] == m["checks"]["cost_usd"]
    assert [orjson.loads(x)["custom_id"] for x in (dest / "failures.jsonl").read_bytes().splitlines()] == ["r1", "r2"]


def test_metric_counts_include_unusable_answers_and_direct_requests() -> None:
    from airflow_provider_synth.operators import _native

    counts = _native.metric_counts({"total": 10, "succeeded": 10, "direct_requests": 2,
                                    "checks": {"truncated": 3, "refused": 0, "schema_invalid": 1}})
    assert counts["answers.truncated"] == 3 and counts["answers.schema_invalid"] == 1
    assert counts["requests.direct"] == 2 and "answers.refused" not in counts
