"""The direct-API tail against the local server: answers as batch lines, errors as error lines, a crash resumed
after the last recorded part (no recorded call is made twice), Azure deployments, the cost estimate."""

from __future__ import annotations

import json

import orjson
import pytest
from airflow.models.connection import Connection

from airflow_provider_synth.batch.results import parse_output_line
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.runs import openai_direct
from airflow_provider_synth.runs.openai_direct import DirectRounds, answer_round, estimate_direct_cost
from airflow_provider_synth.server.server import Outcome


def request(cid: str, url: str = "/v1/chat/completions", model: str = "gpt-4o-mini") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": f"question {cid}"}], "max_completion_tokens": 50}
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


@pytest.fixture
def conn(monkeypatch, batch_server):
    c = Connection(conn_id="srv", conn_type="synth_openai", password="sk-direct-7f3a", host=batch_server.base_url,
                   extra=json.dumps({"max_retries": 0}))
    monkeypatch.setenv("AIRFLOW_CONN_SRV", c.as_json())
    az = Connection(conn_id="az", conn_type="synth_azure_openai", password="k", host=batch_server.azure_endpoint,
                    extra=json.dumps({"api_version": "2025-04-01-preview", "max_retries": 0}))
    monkeypatch.setenv("AIRFLOW_CONN_AZ", az.as_json())
    return batch_server


def read_parts(rounds: DirectRounds, shard: int, rnd: int) -> list:
    return [parse_output_line(x) for p in rounds.outputs(shard, rnd) for x in open(p, "rb").read().splitlines()]


def test_answers_and_errors_become_output_lines(conn, tmp_path) -> None:
    conn.set_outcome("bad", Outcome.error(400, code="invalid_prompt"))
    conn.set_outcome("down", Outcome.error(503))
    rounds = DirectRounds(str(tmp_path))
    reqs = [request(c) for c in ("a", "b", "bad", "down")]
    assert answer_round(OpenAIBatchHook("srv"), rounds, 0, 1, reqs, concurrency=3) == 4
    outs = {o.custom_id: o for o in read_parts(rounds, 0, 1)}
    assert outs["a"].ok and outs["b"].ok and outs["a"].usage is not None
    assert (outs["bad"].status_code, outs["bad"].error_code, outs["bad"].retryable) == (400, "invalid_prompt", False)
    assert (outs["down"].status_code, outs["down"].retryable) == (503, True)
    saved = DirectRounds.load(str(tmp_path))
    assert saved.get(0, 1) == {"requests": 4, "parts": 1, "done": True}
    summary = saved.summary("gpt-4o-mini", None)
    assert summary["direct_requests"] == 4 and summary["direct_usage"]["requests"] == 2
    assert summary["direct_cost_usd"] > 0


def test_a_crash_resumes_after_the_last_recorded_part(conn, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(openai_direct, "PART_LINES", 2)
    reqs = [request(f"r{i}") for i in range(7)]
    hook = OpenAIBatchHook("srv")
    real, calls = hook.create_direct, []

    def dies_on_the_fifth(url, body, *, custom_id=None):
        calls.append(custom_id)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the worker dies mid-round
        return real(url, body, custom_id=custom_id)

    monkeypatch.setattr(hook, "create_direct", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        answer_round(hook, DirectRounds(str(tmp_path)), 2, 1, reqs, concurrency=1)
    saved = DirectRounds.load(str(tmp_path))
    assert saved.get(2, 1)["done"] is False and saved.get(2, 1)["parts"] >= 2
    recorded = {o.custom_id for o in read_parts(saved, 2, 1)}
    # every answer that came back before the crash is recorded (the pool's thread may have answered one or two
    # more queued requests while the crash unwound: those are recorded too, never lost); the crashed call is not
    assert {"r0", "r1", "r2", "r3"} <= recorded and "r4" not in recorded
    before = conn.counters["direct_requests"]
    assert before >= len(recorded)
    resumed, resumed_calls = OpenAIBatchHook("srv"), []
    real_resumed = resumed.create_direct

    def counted(url, body, *, custom_id=None):
        resumed_calls.append(custom_id)
        return real_resumed(url, body, custom_id=custom_id)

    monkeypatch.setattr(resumed, "create_direct", counted)
    made = answer_round(resumed, saved, 2, 1, reqs, concurrency=2)
    # only the unanswered requests are sent again (the server's own counter may also see a transport-level
    # retry of the SDK on a loaded machine, so the calls are counted where they are made)
    todo = sorted({f"r{i}" for i in range(7)} - recorded)
    assert made == len(todo) and sorted(resumed_calls) == todo
    assert conn.counters["direct_requests"] >= before + len(todo)
    ids = [o.custom_id for o in read_parts(saved, 2, 1)]
    assert sorted(ids) == [f"r{i}" for i in range(7)] and DirectRounds.load(str(tmp_path)).get(2, 1)["done"]


def test_azure_sends_to_the_deployment_and_every_endpoint_works(conn, tmp_path) -> None:
    rounds = DirectRounds(str(tmp_path))
    emb = orjson.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                        "body": {"model": "text-embedding-3-small", "input": "hi"}})
    answer_round(OpenAIBatchHook("az"), rounds, 0, 1, [request("c", model="my-deployment"), emb], concurrency=2)
    outs = {o.custom_id: orjson.loads(o.raw) for o in read_parts(rounds, 0, 1)}
    assert outs["c"]["response"]["body"]["model"] == "my-deployment"
    assert len(outs["e"]["response"]["body"]["data"][0]["embedding"]) == 1536
    routes = conn.counters["http_requests"]
    assert routes["POST /openai/deployments/{deployment}/{endpoint}"] == 2


def test_direct_cost_estimate_is_at_the_full_price() -> None:
    reqs = [request(f"r{i}") for i in range(10)]
    est = estimate_direct_cost(reqs, "gpt-4o-mini", None)
    assert est is not None and est >= 10 * 50 * 0.60 / 1e6  # at least the output the requests allow, full price
    assert estimate_direct_cost(reqs, "unknown-model", None) is None


def test_flex_tail_is_estimated_at_batch_prices_unless_it_may_fall_back() -> None:
    from airflow_provider_synth.runs.openai_direct import Tier

    reqs = [request(f"r{i}") for i in range(10)]
    direct = estimate_direct_cost(reqs, "gpt-4o-mini", None)
    assert estimate_direct_cost(reqs, "gpt-4o-mini", None, Tier("flex")) == pytest.approx(direct / 2, abs=1e-6)
    assert estimate_direct_cost(reqs, "gpt-4o-mini", None, Tier("flex", fallback=True)) == direct


def test_flex_requests_carry_the_tier_and_the_longer_timeout(conn, tmp_path, monkeypatch) -> None:
    from airflow_provider_synth.runs.openai_direct import FLEX_TIMEOUT_S, Tier

    hook = OpenAIBatchHook("srv")
    real, seen = hook.create_direct, []

    def spy(url, body, *, custom_id=None, **options):
        seen.append((body.get("service_tier"), options.get("timeout")))
        return real(url, body, custom_id=custom_id, **options)

    monkeypatch.setattr(hook, "create_direct", spy)
    rounds = DirectRounds(str(tmp_path))
    answer_round(hook, rounds, 0, 1, [request("a"), request("b")], concurrency=2, tier=Tier("flex"))
    assert seen == [("flex", FLEX_TIMEOUT_S)] * 2
    summary = rounds.summary("gpt-4o-mini", None)
    assert summary["direct_tiers"] == {"flex": 2}
    from airflow_provider_synth.batch.usage import Usage, cost_usd

    assert summary["direct_cost_usd"] == cost_usd(Usage.from_dict(summary["direct_usage"]), "gpt-4o-mini")
