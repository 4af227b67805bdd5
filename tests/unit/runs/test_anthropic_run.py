"""The Message Batches run against the local server through the real anthropic SDK over HTTP: plan, submit,
re-attach after a crash, retry only what a retry can fix, cancel, collect in input order with the users' ids."""

from __future__ import annotations

import json
import time

import orjson
import pytest

pytest.importorskip("anthropic")

from airflow.models import Connection  # noqa: E402

from airflow_provider_synth.batch.checks import OutputChecks  # noqa: E402
from airflow_provider_synth.batch.errors import InvalidRequestsError  # noqa: E402
from airflow_provider_synth.batch.extract import extract_text, iter_output  # noqa: E402
from airflow_provider_synth.batch.split import ShardLimits  # noqa: E402
from airflow_provider_synth.hooks.anthropic import AnthropicBatchHook  # noqa: E402
from airflow_provider_synth.runs.anthropic import AnthropicPlan, AnthropicRun, plan_run  # noqa: E402
from airflow_provider_synth.runs.anthropic_messages import Translation  # noqa: E402
from airflow_provider_synth.runs.base import RunIdentity  # noqa: E402
from airflow_provider_synth.server.config import Outcome, OutcomeRule  # noqa: E402

API_KEY = "sk-ant-local-secret"
IDENTITY = RunIdentity("dag", "task", "run-1")


@pytest.fixture
def server(batch_server_factory):
    return batch_server_factory(api_key=API_KEY, shuffle_output=True)


@pytest.fixture
def conn_id(monkeypatch, server):
    conn = Connection(conn_id="claude", conn_type="anthropic", password=API_KEY, host=server.url,
                      extra=json.dumps({"anthropic_client_kwargs": {"max_retries": 0, "timeout": 10}}))
    monkeypatch.setenv("AIRFLOW_CONN_CLAUDE", conn.as_json())
    return "claude"


def write_input(path, ids):
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "claude-haiku-4-5", "max_tokens": 64,
                       "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": f"Describe {cid}"}]}} for cid in ids]
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    return path


def make_run(tmp_path, conn_id, ids, *, limits=ShardLimits(), checks=None, max_rounds=2):
    src = write_input(tmp_path / "in.jsonl", ids)
    plan = plan_run(src, work_dir=str(tmp_path / "out" / "_work"), output_dir=str(tmp_path / "out"),
                    conn_id=conn_id, identity=IDENTITY, options=Translation(), limits=limits, checks=checks)
    plan.save()
    run = AnthropicRun(AnthropicBatchHook(conn_id), plan, checks=checks, max_rounds=max_rounds)
    run.attach()
    return run


def drive(run, timeout=30.0):
    """Rounds until nothing is left to submit: the operator's loop, waiting by polling."""
    deadline = time.time() + timeout
    while True:
        if not run.running:
            if not run.next_round():
                return run.collect()
            run.submit()
        while run.running:
            assert time.time() < deadline, run.states()
            time.sleep(0.05)
            assert run.poll() == []


def test_a_run_lands_every_answer_in_input_order_with_the_users_ids(tmp_path, conn_id, server):
    ids = [f"doc {i}/é" if i % 3 == 0 else f"doc-{i}" for i in range(7)]
    run = make_run(tmp_path, conn_id, ids, limits=ShardLimits(max_requests=3))
    assert len(run.plan.shards) == 3 and run.plan.mapped_ids == 3
    acct = drive(run)
    assert (acct.total, acct.succeeded, acct.failed) == (7, 7, 0)
    rows = list(iter_output(tmp_path / "out" / "results.jsonl"))
    assert [r["custom_id"] for r in rows] == ids
    assert all(r["response"]["body"]["type"] == "message" and extract_text(r) for r in rows)
    assert server.counters["message_batches_created"] == 3
    manifest = run.manifest(acct, "completed")
    assert manifest["backend"] == "anthropic" and len(manifest["batch_ids"]) == 3
    assert manifest["usage"]["prompt_tokens"] == acct.usage.prompt_tokens > 0
    assert manifest["cost_usd"] is not None and manifest["est_cost_usd"] is not None
    assert API_KEY not in json.dumps(manifest)


def test_only_fixable_errors_are_retried_and_invalid_requests_are_final(tmp_path, conn_id, server):
    server.app.configure(outcomes=[
        OutcomeRule("r-over", Outcome.error(529, code="overloaded_error"), times=1),
        OutcomeRule("r-api", Outcome.error(500), times=1),
        OutcomeRule("r-rate", Outcome.error(429), times=1),
        OutcomeRule("r-bad", Outcome.error(400, message="messages: roles must alternate")),
        OutcomeRule("r-exp", Outcome.expired(), times=1),
    ])
    ids = ["r-ok", "r-over", "r-api", "r-rate", "r-bad", "r-exp"]
    run = make_run(tmp_path, conn_id, ids)
    acct = drive(run)
    assert (acct.succeeded, acct.failed) == (5, 1)
    failures = list(iter_output(tmp_path / "out" / "failures.jsonl"))
    assert [(f["custom_id"], f["error"]["code"], f["retryable"]) for f in failures] == \
        [("r-bad", "invalid_request_error", False)]
    assert "roles must alternate" in failures[0]["error"]["message"]
    # round 1 resubmitted the four fixable ones alone; nothing finished was sent again
    assert server.counters["requests_processed"] == 6 + 4
    assert [i.requests for i in run.intents] == [6, 4]


def test_a_crash_between_create_and_record_re_attaches_and_pays_nothing_twice(tmp_path, conn_id, server, monkeypatch):
    run = make_run(tmp_path, conn_id, ["a", "b", "c"])
    run.next_round()
    real = run._save_intents
    calls = []

    def crash_after_create():
        calls.append(1)
        if len(calls) == 2:  # the intent was written, the batch created; the id is never recorded
            raise KeyboardInterrupt("worker killed")
        real()

    monkeypatch.setattr(run, "_save_intents", crash_after_create)
    with pytest.raises(KeyboardInterrupt):
        run.submit()
    assert json.loads((tmp_path / "out" / "_work" / "intents.json").read_text())[0]["batch_id"] is None
    # the retried task: a new run object over the same plan
    again = AnthropicRun(AnthropicBatchHook(conn_id), AnthropicPlan.load(str(tmp_path / "out" / "_work")))
    again.attach()
    assert len(again.batch_ids) == 1
    assert again.next_round() == [] and again.submit() == []
    acct = drive(again)
    assert acct.succeeded == 3 and server.counters["message_batches_created"] == 1


def test_an_intent_whose_create_never_happened_is_submitted(tmp_path, conn_id, server):
    run = make_run(tmp_path, conn_id, ["a", "b"])
    (tmp_path / "out" / "_work" / "intents.json").write_text(json.dumps(
        [{"shard": 0, "round": 0, "requests": 2, "at": time.time(), "batch_id": None}]))
    run.attach()
    assert run.batch_ids == [] and run.next_round() == [(0, 0)]
    assert drive(run).succeeded == 2 and server.counters["message_batches_created"] == 1


def test_cancel_keeps_what_finished_and_a_retry_round_takes_the_rest(tmp_path, conn_id, batch_server_factory,
                                                                     monkeypatch):
    slow = batch_server_factory(api_key=API_KEY, in_progress_s=30.0, progress_steps=30)
    conn = Connection(conn_id="slow", conn_type="anthropic", password=API_KEY, host=slow.url)
    monkeypatch.setenv("AIRFLOW_CONN_SLOW", conn.as_json())
    run = make_run(tmp_path, "slow", [f"x{i}" for i in range(30)], max_rounds=0)
    run.next_round()
    run.submit()
    deadline = time.time() + 10
    while not run.states_by_id[run.batch_ids[0]]["request_counts"]["succeeded"]:
        assert time.time() < deadline
        time.sleep(0.1)
        run.poll()
    assert run.cancel() == run.batch_ids
    while run.running:
        time.sleep(0.05)
        run.poll()
    acct = run.collect()
    assert 0 < acct.succeeded < 30 and acct.succeeded + acct.failed == 30
    assert set(acct.error_codes) == {"batch_cancelled"}


def test_untranslatable_lines_are_refused_before_anything_is_sent(tmp_path, conn_id, server):
    src = tmp_path / "in.jsonl"
    src.write_bytes(orjson.dumps({"custom_id": "t", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": "claude-haiku-4-5", "temperature": 0.2,
                                           "messages": [{"role": "user", "content": "x"}]}}) + b"\n")
    with pytest.raises(InvalidRequestsError, match=r"in.jsonl:1 custom_id='t': temperature cannot be sent"):
        plan_run(src, work_dir=str(tmp_path / "w"), output_dir=str(tmp_path / "o"), conn_id=conn_id,
                 identity=IDENTITY, options=Translation())
    assert server.counters["http_requests_total"] == 0


def test_checks_retry_a_truncated_answer_with_more_tokens(tmp_path, conn_id, server):
    server.app.configure(outcomes=[OutcomeRule("cut", Outcome.truncated(), times=1)])
    checks = OutputChecks(finish_reasons={"length"}, retry_body={"truncated": {"max_tokens": 500}})
    run = make_run(tmp_path, conn_id, ["ok", "cut"], checks=checks)
    acct = drive(run)
    assert acct.succeeded == 2 and acct.unusable["truncated"] == 1
    retried = [orjson.loads(x) for x in (tmp_path / "out" / "_work" / "shards" / "shard-00000-r1.jsonl")
               .read_bytes().splitlines()]
    assert [(r["custom_id"], r["params"]["max_tokens"], "body" in r) for r in retried] == [("cut", 500, False)]


def test_structured_output_as_one_forced_tool_on_2023_06_01(tmp_path, conn_id, server):
    """SDK 1.x's API version has no output_config: the schema goes as one forced tool, whose input is the
    answer the checks validate and extract_parsed reads."""
    from airflow_provider_synth.batch.extract import extract_parsed

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "Person", "schema": schema, "strict": True}}
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/chat/completions",
                                           "body": {"model": "claude-haiku-4-5", "response_format": rf,
                                                    "messages": [{"role": "user", "content": "a person"}]}}) + b"\n"
                             for i in range(3)))
    checks = OutputChecks(schema=rf)
    plan = plan_run(src, work_dir=str(tmp_path / "out" / "_work"), output_dir=str(tmp_path / "out"),
                    conn_id=conn_id, identity=IDENTITY, options=Translation(api_version="2023-06-01"), checks=checks)
    shard = orjson.loads((tmp_path / "out" / "_work" / "shards" / "shard-00000-r0.jsonl").read_bytes().splitlines()[0])
    assert shard["params"]["tool_choice"] == {"type": "tool", "name": "synth_response_format"}
    run = AnthropicRun(AnthropicBatchHook(conn_id), plan, checks=checks)
    run.attach()
    acct = drive(run)
    assert acct.succeeded == 3 and not acct.unusable
    rows = list(iter_output(tmp_path / "out" / "results.jsonl"))
    assert rows[0]["response"]["body"]["content"][0]["type"] == "tool_use"
    assert all(set(extract_parsed(r)) == {"name"} for r in rows)
