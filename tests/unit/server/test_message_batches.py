"""The local server's Message Batches API, driven by the official anthropic SDK over HTTP, unchanged."""

from __future__ import annotations

import time
from typing import Any

import pytest

anthropic = pytest.importorskip("anthropic")

from airflow_provider_synth.server.config import Outcome, OutcomeRule  # noqa: E402

KEY = "sk-ant-server-test"


def params(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-haiku-4-5", "max_tokens": 200, "messages": [{"role": "user", "content": text}], **extra}


def client(server, **kwargs: Any) -> Any:
    return anthropic.Anthropic(api_key=KEY, base_url=server.url, max_retries=0, **kwargs)


def wait_ended(c, batch_id: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := c.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, batch
        time.sleep(0.02)
    return batch


@pytest.fixture
def server(batch_server_factory):
    return batch_server_factory(api_key=KEY, shuffle_output=True)


def test_create_retrieve_list_results_with_outcomes(server):
    server.app.configure(outcomes=[
        OutcomeRule("over", Outcome.error(529, code="overloaded_error")),
        OutcomeRule("bad", Outcome.error(400, message="max_tokens: too large")),
        OutcomeRule("rate", Outcome.error(429)),
        OutcomeRule("gone", Outcome.expired()),
        OutcomeRule("cut", Outcome.truncated()),
        OutcomeRule("no", Outcome.refused("I can't help with that.")),
    ])
    c = client(server)
    ids = ["ok", "over", "bad", "rate", "gone", "cut", "no"]
    batch = c.messages.batches.create(requests=[{"custom_id": i, "params": params(f"say {i}")} for i in ids])
    assert batch.id.startswith("msgbatch_") and batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 7 and batch.results_url is None
    ended = wait_ended(c, batch.id)
    assert ended.request_counts.model_dump() == {"processing": 0, "succeeded": 3, "errored": 3, "canceled": 0,
                                                 "expired": 1}
    assert ended.ended_at is not None and ended.results_url.endswith(f"/v1/messages/batches/{batch.id}/results")
    results = {r.custom_id: r.result for r in c.messages.batches.results(batch.id)}
    assert set(results) == set(ids)
    assert results["ok"].type == "succeeded" and results["ok"].message.stop_reason == "end_turn"
    assert results["ok"].message.content[0].type == "text" and results["ok"].message.usage.input_tokens > 0
    assert results["cut"].message.stop_reason == "max_tokens"
    assert results["no"].message.stop_reason == "refusal"
    assert [results[i].error.error.type for i in ("over", "bad", "rate")] == \
        ["overloaded_error", "invalid_request_error", "rate_limit_error"]
    assert results["bad"].error.error.message == "max_tokens: too large"
    assert results["gone"].type == "expired"
    assert [b.id for b in c.messages.batches.list(limit=10)] == [batch.id]
    # the OpenAI routes never see a message batch
    assert server.counters["batches_created"] == 0


def test_structured_output_and_tools_come_back_as_blocks(server):
    c = client(server)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    tool = {"name": "lookup", "description": "d", "input_schema": schema}
    batch = c.messages.batches.create(requests=[
        {"custom_id": "json", "params": params("x", output_config={"format": {"type": "json_schema", "schema": schema}})},
        {"custom_id": "tool", "params": params("y", tools=[tool], tool_choice={"type": "tool", "name": "lookup"})},
    ])
    wait_ended(c, batch.id)
    results = {r.custom_id: r.result.message for r in c.messages.batches.results(batch.id)}
    import json

    assert set(json.loads(results["json"].content[0].text)) == {"name"}
    block = results["tool"].content[0]
    assert block.type == "tool_use" and block.name == "lookup" and set(block.input) == {"name"}
    assert results["tool"].stop_reason == "tool_use"


def test_cancel_ends_with_canceled_requests(batch_server_factory):
    server = batch_server_factory(api_key=KEY, in_progress_s=30.0, progress_steps=30)
    c = client(server)
    batch = c.messages.batches.create(requests=[{"custom_id": f"r{i}", "params": params("x")} for i in range(30)])
    canceled = c.messages.batches.cancel(batch.id)
    assert canceled.processing_status == "canceling" and canceled.cancel_initiated_at is not None
    ended = wait_ended(c, batch.id)
    assert ended.request_counts.canceled + ended.request_counts.succeeded == 30 and ended.request_counts.canceled
    with pytest.raises(anthropic.BadRequestError, match="can no longer be canceled"):
        c.messages.batches.cancel(batch.id)


def test_the_api_checks_what_it_is_sent(server):
    c = client(server)
    with pytest.raises(anthropic.BadRequestError, match="custom_id: must be 1-64"):
        c.messages.batches.create(requests=[{"custom_id": "has space", "params": params("x")}])
    with pytest.raises(anthropic.BadRequestError, match="used more than once"):
        c.messages.batches.create(requests=[{"custom_id": "a", "params": params("x")}] * 2)
    with pytest.raises(anthropic.NotFoundError) as info:
        c.messages.batches.retrieve("msgbatch_nope")
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key="wrong", base_url=server.url, max_retries=0).messages.batches.list()
    # the SDK 1.x header is accepted too
    import httpx2

    assert httpx2.get(f"{server.url}/v1/messages/batches", headers={"x-api-key": KEY}).status_code == 200


def test_faults_answer_in_anthropic_shape_and_the_sdk_retries_them(server):
    server.app.configure(add_faults=[{"route": "GET /v1/messages/batches/*", "status": 529, "times": 2}])
    c = client(server)
    batch = c.messages.batches.create(requests=[{"custom_id": "a", "params": params("x")}])
    with pytest.raises(anthropic.APIStatusError) as info:
        c.messages.batches.retrieve(batch.id)
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"
    retrying = anthropic.Anthropic(api_key=KEY, base_url=server.url, max_retries=2)
    assert retrying.messages.batches.retrieve(batch.id).id == batch.id


def test_gateway_answers_through_the_openai_compatible_upstream(batch_server_factory):
    from tests.unit.server.test_batch_server_gateway import Upstream

    up = Upstream().start()
    try:
        server = batch_server_factory(api_key=KEY, upstream_url=f"http://127.0.0.1:{up.port}/v1",
                                      upstream_model="local-llama", in_progress_s=0.0)
        c = client(server)
        batch = c.messages.batches.create(requests=[
            {"custom_id": "a", "params": {**params("hello-1"), "system": "Be brief."}},
            {"custom_id": "b", "params": params("bad-1")}])
        wait_ended(c, batch.id)
        results = {r.custom_id: r.result for r in c.messages.batches.results(batch.id)}
        assert results["a"].message.content[0].text == "upstream answer to Be brief."
        assert results["b"].error.error.type == "invalid_request_error"
        assert up.models == {"local-llama"}
    finally:
        up.stop()
