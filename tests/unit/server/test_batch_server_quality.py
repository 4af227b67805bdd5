"""The local server's outcomes for the quality loop: cut-off and refused answers, and the synchronous endpoints
following the per-custom_id outcome rules (``X-Client-Request-Id``)."""

from __future__ import annotations

import time
from typing import Any

import openai
import orjson
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from airflow_provider_synth.server.server import BatchServer, Outcome

CHAT = "/v1/chat/completions"
SCHEMA = {"type": "json_schema", "json_schema": {"name": "q", "strict": True, "schema": {
    "type": "object", "properties": {"question": {"type": "string"}}, "required": ["question"],
    "additionalProperties": False}}}


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write a question."}], **extra}


def run_batch(srv: BatchServer, lines: list[dict[str, Any]], endpoint: str = CHAT) -> dict[str, dict[str, Any]]:
    client = OpenAI(base_url=srv.base_url, api_key="sk-test")
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    out = client.files.content(batch.output_file_id).content if batch.output_file_id else b""
    return {x["custom_id"]: x for x in map(orjson.loads, out.splitlines())}


def test_truncated_and_refused_outcomes_in_a_batch(batch_server: BatchServer) -> None:
    batch_server.set_outcome("cut-*", Outcome.truncated(), times=1)
    batch_server.set_outcome("no-*", Outcome.refused("I can't help with that."))
    lines = [{"custom_id": cid, "method": "POST", "url": CHAT, "body": chat_body(response_format=SCHEMA)}
             for cid in ("cut-1", "no-1", "ok-1")]
    got = run_batch(batch_server, lines)
    bodies = {cid: ChatCompletion.model_validate(x["response"]["body"]) for cid, x in got.items()}
    full = orjson.loads(bodies["ok-1"].choices[0].message.content or "")
    assert set(full) == {"question"} and bodies["ok-1"].choices[0].finish_reason == "stop"
    cut = bodies["cut-1"].choices[0]
    assert cut.finish_reason == "length" and cut.message.content
    with pytest.raises(orjson.JSONDecodeError):  # half of a JSON object
        orjson.loads(cut.message.content)
    refused = bodies["no-1"].choices[0].message
    assert refused.refusal == "I can't help with that." and refused.content is None
    # times=1: the retry of the cut-off request gets the whole answer
    again = run_batch(batch_server, lines[:1])["cut-1"]["response"]["body"]["choices"][0]
    assert again["finish_reason"] == "stop" and orjson.loads(again["message"]["content"])


def test_truncated_responses_answer_is_incomplete(batch_server: BatchServer) -> None:
    batch_server.set_outcome("*", Outcome.truncated())
    lines = [{"custom_id": "r", "method": "POST", "url": "/v1/responses",
              "body": {"model": "gpt-4o-mini", "input": "hello there"}}]
    body = Response.model_validate(run_batch(batch_server, lines, "/v1/responses")["r"]["response"]["body"])
    assert body.status == "incomplete" and body.incomplete_details is not None
    assert body.incomplete_details.reason == "max_output_tokens"


def test_synchronous_endpoints_follow_the_outcome_of_the_client_request_id(batch_server: BatchServer) -> None:
    client = OpenAI(base_url=batch_server.base_url, api_key="sk-test", max_retries=0)
    batch_server.set_outcome("flaky", Outcome.error(500), times=1)
    batch_server.set_outcome("bad", Outcome.error(400, code="invalid_prompt"))
    batch_server.set_outcome("cut", Outcome.truncated())
    batch_server.set_outcome("gone", Outcome.expired())

    def call(cid: str | None) -> dict[str, Any]:
        headers = {"X-Client-Request-Id": cid} if cid else {}
        return client.post("/chat/completions", cast_to=dict, body=chat_body(), options={"headers": headers})

    with pytest.raises(openai.InternalServerError):
        call("flaky")
    assert call("flaky")["choices"][0]["finish_reason"] == "stop"  # the rule's one attempt is spent
    with pytest.raises(openai.BadRequestError) as err:
        call("bad")
    assert err.value.code == "invalid_prompt"
    assert call("cut")["choices"][0]["finish_reason"] == "length"
    with pytest.raises(openai.APIStatusError) as timeout:
        call("gone")
    assert timeout.value.status_code == 408
    # the same custom_id gets the same answer as in a batch; no header: no rule applies
    batch = run_batch(batch_server, [{"custom_id": "same", "method": "POST", "url": CHAT, "body": chat_body()}])
    assert call("same")["choices"] == batch["same"]["response"]["body"]["choices"]
    batch_server.set_outcome("*", Outcome.error(500))
    assert call(None)["object"] == "chat.completion"
    counters = batch_server.counters
    assert counters["direct_requests"] == 7 and counters["direct_requests_answered"] == 3
