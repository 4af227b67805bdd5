"""AnthropicBatchTrigger against the local server's Message Batches API, through AsyncAnthropic over HTTP; the
sync hook is booby-trapped, so any blocking call inside the trigger fails the test."""

from __future__ import annotations

import json
import time

import pytest

anthropic = pytest.importorskip("anthropic")

from airflow.sdk import Connection  # noqa: E402

from airflow_provider_synth.hooks.anthropic import (  # noqa: E402
    AnthropicBatchAsyncHook,
    AnthropicBatchHook,
    is_transient,
)
from airflow_provider_synth.triggers.anthropic import AnthropicBatchTrigger  # noqa: E402

KEY = "sk-ant-trigger-SECRET-123"


@pytest.fixture
def server(batch_server_factory):
    return batch_server_factory(api_key=KEY)


@pytest.fixture
def conn_id(monkeypatch, server):
    conn = Connection(conn_id="claude_t", conn_type="anthropic", password=KEY, host=server.url,
                      extra=json.dumps({"anthropic_client_kwargs": {"max_retries": 0}}))
    monkeypatch.setenv("AIRFLOW_CONN_CLAUDE_T", conn.as_json())
    return "claude_t"


@pytest.fixture
def batches(server, conn_id):
    """Two batches created with the sync client (as the operator does), then the sync paths are trapped."""
    c = anthropic.Anthropic(api_key=KEY, base_url=server.url)
    made = [c.messages.batches.create(requests=[{"custom_id": f"r{i}", "params": {
        "model": "claude-haiku-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}}
        for i in range(n)]).id for n in (2, 3)]
    return made


@pytest.fixture
def no_sync(monkeypatch, batches):
    def trap(*a, **k):
        raise AssertionError("a blocking call inside the trigger")

    monkeypatch.setattr(AnthropicBatchHook, "get_connection", classmethod(trap))
    monkeypatch.setattr(AnthropicBatchHook, "get_conn", trap)


async def events(trigger):
    return [e.payload async for e in trigger.run()]


def test_serialize_round_trip_is_json_primitives_without_secrets():
    t = AnthropicBatchTrigger("c", ["msgbatch_1", "msgbatch_2"], poll_interval=5, end_time=123.0)
    path, kwargs = t.serialize()
    assert path == "airflow_provider_synth.triggers.anthropic.AnthropicBatchTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs and KEY not in json.dumps(kwargs)
    again = AnthropicBatchTrigger(**kwargs)
    assert again.serialize() == (path, kwargs) and again.end_time == 123.0
    with pytest.raises(ValueError, match="at least one message batch id"):
        AnthropicBatchTrigger("c", [])


async def test_one_terminal_event_with_each_batch_final_state(batches, no_sync, conn_id):
    got = await events(AnthropicBatchTrigger(conn_id, batches, poll_interval=0.05))
    assert len(got) == 1
    event = got[0]
    assert event["status"] == "success" and set(event["batches"]) == set(batches)
    assert [event["batches"][b]["request_counts"]["succeeded"] for b in batches] == [2, 3]
    assert all(s["status"] == "ended" and s["results_url"] for s in event["batches"].values())
    assert "5 succeeded" in event["message"] and KEY not in json.dumps(event)


async def test_429_529_and_5xx_are_polled_again(server, batches, no_sync, conn_id):
    server.app.configure(add_faults=[{"route": "GET /v1/messages/batches/*", "status": s, "times": 1}
                                     for s in (529, 429, 503)])
    event = (await events(AnthropicBatchTrigger(conn_id, batches, poll_interval=0.02)))[0]
    assert event["status"] == "success"
    assert server.counters["faults_injected"] == 3


async def test_too_many_transient_errors_and_a_fatal_one_end_the_wait(server, batches, no_sync, conn_id):
    server.app.configure(add_faults=[{"route": "GET /v1/messages/batches/*", "status": 529, "times": None}])
    event = (await events(AnthropicBatchTrigger(conn_id, batches[:1], poll_interval=0.01,
                                                max_consecutive_errors=2)))[0]
    assert event["status"] == "error" and "3 times in a row" in event["message"]
    server.app.configure(faults=[])
    event = (await events(AnthropicBatchTrigger(conn_id, ["msgbatch_missing"], poll_interval=0.01)))[0]
    assert event["status"] == "error" and "NotFoundError" in event["message"]


async def test_deadline_is_absolute(batch_server_factory, monkeypatch, conn_id):
    slow = batch_server_factory(api_key=KEY, in_progress_s=60.0, progress_steps=30)
    monkeypatch.setenv("AIRFLOW_CONN_CLAUDE_T", Connection(conn_id="claude_t", conn_type="anthropic", password=KEY,
                                                           host=slow.url).as_json())
    c = anthropic.Anthropic(api_key=KEY, base_url=slow.url)
    batch = c.messages.batches.create(requests=[{"custom_id": f"a{i}", "params": {
        "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}} for i in range(30)]).id
    end_time = time.time() + 0.3
    t = AnthropicBatchTrigger(conn_id, [batch], poll_interval=0.05, end_time=end_time)
    event = (await events(t))[0]
    assert event["status"] == "timeout" and batch in event["message"]
    # a trigger re-created from its kwargs (triggerer restart) keeps the deadline: it times out at once
    again = AnthropicBatchTrigger(**t.serialize()[1])
    started = time.monotonic()
    assert (await events(again))[0]["status"] == "timeout" and time.monotonic() - started < 1.0
    await again.on_kill()  # cancels what still runs
    assert c.messages.batches.retrieve(batch).processing_status in ("canceling", "ended")


async def test_an_unknown_status_is_an_error(batches, no_sync, conn_id, monkeypatch):
    async def weird(self, batch_id):
        return {"status": "archived?", "request_counts": {}}

    monkeypatch.setattr(AnthropicBatchAsyncHook, "aget_batch_state", weird)
    event = (await events(AnthropicBatchTrigger(conn_id, batches, poll_interval=0.01)))[0]
    assert event["status"] == "error" and "unknown status 'archived?'" in event["message"]


def test_transient_classification():
    import httpx2

    req = httpx2.Request("GET", "http://x")

    def status(code):
        return anthropic.APIStatusError("e", response=httpx2.Response(code, request=req), body=None)

    assert [is_transient(status(c)) for c in (429, 529, 500, 503, 400, 401, 404)] == \
        [True, True, True, True, False, False, False]
    assert is_transient(anthropic.APIConnectionError(request=req))
