"""The OpenAI batch line -> Anthropic Messages translation, and Anthropic results -> output lines."""

from __future__ import annotations

import base64

import orjson
import pytest

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.errors import InvalidRequestsError
from airflow_provider_synth.batch.extract import extract_parsed, extract_text, extract_tool_calls
from airflow_provider_synth.batch.merge import ShardOutputs, merge_shards
from airflow_provider_synth.batch.results import parse_output_line
from airflow_provider_synth.batch.usage import Usage, usage_from_body
from airflow_provider_synth.runs.anthropic_messages import (
    API_VERSION_2023,
    STRUCTURED_TOOL,
    Translated,
    Translation,
    TranslationError,
    anthropic_cost,
    anthropic_custom_id,
    output_line,
    result_lines,
    to_request,
    translate_lines,
)

V26 = Translation()
V23 = Translation(api_version=API_VERSION_2023)


def chat(body: dict, cid: str = "r-1") -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "claude-haiku-4-5", **body}}


def params(body: dict, options: Translation = V26) -> dict:
    return to_request(chat(body), options).params


def test_system_messages_max_tokens_and_stop() -> None:
    p = params({"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "developer", "content": [{"type": "text", "text": "JSON only."}]},
                             {"role": "user", "content": "hi"}],
                "max_completion_tokens": 50, "stop": "END"})
    assert p == {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
                 "system": "Be brief.\n\nJSON only.", "stop_sequences": ["END"]}
    assert params({"messages": [{"role": "user", "content": "x"}], "max_tokens": 7})["max_tokens"] == 7
    # Anthropic requires max_tokens: a documented default, overridable
    assert params({"messages": [{"role": "user", "content": "x"}]})["max_tokens"] == 4096
    assert params({"messages": [{"role": "user", "content": "x"}]},
                  Translation(default_max_tokens=99))["max_tokens"] == 99


def test_sampling_per_api_version() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0.3, "top_p": 0.9}
    assert {k: params(body, V23)[k] for k in ("temperature", "top_p")} == {"temperature": 0.3, "top_p": 0.9}
    with pytest.raises(TranslationError, match="temperature cannot be sent with anthropic-version 2026-10-21"):
        params(body, V26)
    req = to_request(chat(body), Translation(sampling="drop"))
    assert "temperature" not in req.params and req.dropped == ("temperature", "top_p")
    with pytest.raises(TranslationError, match="0 to 1"):
        params({**body, "temperature": 1.5}, V23)
    with pytest.raises(TranslationError, match="seed has no Anthropic counterpart"):
        params({"messages": [{"role": "user", "content": "x"}], "seed": 3}, V23)


def test_tools_tool_choice_and_tool_turns() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find a city",
                                               "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "Oslo"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
            {"role": "tool", "tool_call_id": "call_2", "content": "warm"}]
    p = params({"messages": msgs, "tools": tools, "tool_choice": "required", "parallel_tool_calls": False})
    assert p["tools"] == [{"name": "lookup", "input_schema": tools[0]["function"]["parameters"],
                           "description": "Find a city"}]
    assert p["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert p["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "Oslo"}},
        {"type": "tool_use", "id": "call_2", "name": "lookup", "input": {"q": "Rome"}}]}
    # both tool results in one user turn, as Anthropic wants them
    assert p["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "cold"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "warm"}]}
    named = params({"messages": msgs[:1], "tools": tools,
                    "tool_choice": {"type": "function", "function": {"name": "lookup"}}})
    assert named["tool_choice"] == {"type": "tool", "name": "lookup"}
    assert params({"messages": msgs[:1], "tools": tools, "tool_choice": "none"})["tool_choice"] == {"type": "none"}
    with pytest.raises(TranslationError, match="only function tools"):
        params({"messages": msgs[:1], "tools": [{"type": "web_search"}]})


def test_image_parts() -> None:
    data = base64.b64encode(b"\x89PNG...").decode()
    p = params({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]})
    assert p["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]
    with pytest.raises(TranslationError, match="image/tiff"):
        params({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]})
    with pytest.raises(TranslationError, match="'input_audio' part"):
        params({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]})


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
RF = {"type": "json_schema", "json_schema": {"name": "Person", "schema": SCHEMA, "strict": True}}


def test_response_format_per_api_version() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "response_format": RF}
    assert params(body, V26)["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    tool = params(body, V23)
    assert tool["tools"] == [{"name": STRUCTURED_TOOL, "description": "Answer with the Person object.",
                              "input_schema": SCHEMA}]
    assert tool["tool_choice"] == {"type": "tool", "name": STRUCTURED_TOOL}
    assert "output_config" not in params({**body, "response_format": {"type": "text"}})
    with pytest.raises(ValueError, match="needs api_version 2026-10-21"):
        Translation(api_version=API_VERSION_2023, structured_output="output_config")


@pytest.mark.parametrize(("body", "match"), [
    ({"n": 2}, "n=2"),
    ({"logprobs": True}, "log probabilities"),
    ({"audio": {}}, "audio cannot be translated"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}, "move it to the start"),
    ({"messages": [{"role": "system", "content": "only"}]}, "needs a user turn"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
])
def test_untranslatable_bodies_are_refused(body: dict, match: str) -> None:
    with pytest.raises(TranslationError, match=match):
        params({"messages": [{"role": "user", "content": "x"}], **body})


def test_native_lines_pass_through_and_ids_are_mapped() -> None:
    native = {"custom_id": "n1", "params": {"model": "claude-x", "max_tokens": 5, "top_k": 3, "thinking": {},
                                            "messages": [{"role": "user", "content": "hi"}]}}
    req = to_request(native, V26)
    assert req.params == native["params"] and req.anthropic_id == "n1"
    assert anthropic_custom_id("ok_ID-1") == "ok_ID-1"
    mapped = anthropic_custom_id("doc 1/ü")
    assert mapped != "doc 1/ü" and len(mapped) <= 64 and mapped == anthropic_custom_id("doc 1/ü")
    assert anthropic_custom_id("x" * 65) != "x" * 65


def test_translate_lines_names_file_line_and_custom_id() -> None:
    lines = [
        (1, orjson.dumps(chat({"messages": [{"role": "user", "content": "a"}]}, "a"))),
        (2, orjson.dumps(chat({"messages": [{"role": "user", "content": "b"}], "n": 3}, "b"))),
        (3, b"{not json"),
        (4, orjson.dumps({"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})),
        (5, orjson.dumps(chat({"messages": [{"role": "user", "content": "a"}]}, "a"))),
        (6, orjson.dumps(chat({"messages": [{"role": "user", "content": "e"}]}, "with space"))),
    ]
    summary = Translated()
    got = []
    with pytest.raises(InvalidRequestsError) as info:
        for req in translate_lines(lines, "in.jsonl", V26, summary):
            got.append(req.custom_id)
    text = str(info.value)
    assert "4 invalid request(s), nothing was submitted" in text
    assert "in.jsonl:2 custom_id='b': n=3" in text
    assert "in.jsonl:3: not JSON" in text
    assert "in.jsonl:4 custom_id='d': url '/v1/embeddings'" in text
    assert "in.jsonl:5 custom_id='a': duplicate custom_id" in text
    assert got == ["a", "with space"] and summary.total == 6 and summary.mapped_ids == 1


def msg(text: str | None = "hi", stop: str = "end_turn", **usage: int) -> dict:
    content = [{"type": "text", "text": text}] if text is not None else []
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5", "content": content,
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, **usage}}


@pytest.mark.parametrize(("result", "code", "status", "retryable"), [
    ({"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error",
                                                              "message": "bad model"}}},
     "invalid_request_error", 400, False),
    ({"type": "errored", "error": {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}},
     "overloaded_error", 529, True),
    ({"type": "errored", "error": {"type": "error", "error": {"type": "api_error", "message": "oops"}}},
     "api_error", 500, True),
    ({"type": "errored", "error": {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}},
     "rate_limit_error", 429, True),
    ({"type": "expired"}, "batch_expired", None, True),
    ({"type": "canceled"}, "batch_cancelled", None, False),
])
def test_error_results_are_classified(result: dict, code: str, status: int | None, retryable: bool) -> None:
    out = parse_output_line(output_line("user id/1", result))
    assert (out.custom_id, out.ok, out.error_code, out.status_code, out.retryable) == \
        ("user id/1", False, code, status, retryable)


def test_succeeded_result_keeps_the_message_and_usage_with_cache() -> None:
    m = msg("hello", cache_creation_input_tokens=100, cache_read_input_tokens=200)
    raw = output_line("u1", {"type": "succeeded", "message": m})
    line = orjson.loads(raw)
    assert line["custom_id"] == "u1" and line["response"]["body"] == m and line["response"]["status_code"] == 200
    assert extract_text(line) == "hello"
    out = parse_output_line(raw)
    # prompt: uncached 10 + cache writes 100 + cache reads 200; cached: the reads
    assert out.ok and out.usage == (310, 200, 5, 0, 315)
    u = usage_from_body(m)
    assert (u.prompt_tokens, u.cached_tokens, u.completion_tokens) == (310, 200, 5)


def test_result_lines_match_by_custom_id_in_any_order() -> None:
    ids = {"a": "doc a", "b": "doc b"}
    raws = [orjson.dumps({"custom_id": "b", "result": {"type": "expired"}}),
            orjson.dumps({"custom_id": "zz", "result": {"type": "expired"}}), b"garbage",
            orjson.dumps({"custom_id": "a", "result": {"type": "succeeded", "message": msg()}})]
    got = list(result_lines(raws, ids, "r.jsonl"))
    assert [orjson.loads(g[0])["custom_id"] if g[0] else None for g in got] == ["doc b", None, None, "doc a"]
    assert "r.jsonl:2: custom_id 'zz' is not one of this batch's requests" == got[1][1]
    assert got[2][1].startswith("r.jsonl:3: not a Message Batches result line")


def test_tool_calls_structured_tool_and_checks(tmp_path) -> None:
    tool_msg = msg(None, "tool_use")
    tool_msg["content"] = [{"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {"q": "Oslo"}}]
    line = orjson.loads(output_line("t", {"type": "succeeded", "message": tool_msg}))
    assert extract_tool_calls(line) == [{"id": "tu_1", "name": "lookup", "arguments": {"q": "Oslo"}}]
    assert extract_text(line) is None
    forced = msg(None, "tool_use")
    forced["content"] = [{"type": "tool_use", "id": "tu_2", "name": STRUCTURED_TOOL, "input": {"name": "Ada"}}]
    fline = orjson.loads(output_line("f", {"type": "succeeded", "message": forced}))
    assert extract_parsed(fline) == {"name": "Ada"} and extract_tool_calls(fline) == []

    reqs = tmp_path / "req.jsonl"
    reqs.write_bytes(b"".join(orjson.dumps({"custom_id": c}) + b"\n" for c in ("ok", "cut", "no", "bad", "f")))
    outs = tmp_path / "out.jsonl"
    lines = [output_line("ok", {"type": "succeeded", "message": msg('{"name": "Bo"}')}),
             output_line("cut", {"type": "succeeded", "message": msg('{"na', "max_tokens")}),
             output_line("no", {"type": "succeeded", "message": msg("I can't help with that.", "refusal")}),
             output_line("bad", {"type": "succeeded", "message": msg('{"age": 3}')}),
             output_line("f", {"type": "succeeded", "message": forced})]
    outs.write_bytes(b"\n".join(lines) + b"\n")
    checks = OutputChecks(finish_reasons={"length"}, refusal=True, schema=RF)
    with open(tmp_path / "res.jsonl", "wb") as rf, open(tmp_path / "fail.jsonl", "wb") as ff:
        acct = merge_shards([ShardOutputs(reqs, [outs])], rf, ff, checks)
    assert acct.succeeded == 2 and dict(acct.unusable) == {"truncated": 1, "refused": 1, "schema_invalid": 1}
    results = [orjson.loads(x) for x in (tmp_path / "res.jsonl").read_bytes().splitlines()]
    assert [(r["custom_id"], r["parsed"]) for r in results] == [("ok", {"name": "Bo"}), ("f", {"name": "Ada"})]


def test_cost_at_batch_prices_with_cache_writes() -> None:
    # 1M uncached + 100k cache writes + 200k cache reads in, 100k out
    usage = Usage(prompt_tokens=1_300_000, cached_tokens=200_000, completion_tokens=100_000)
    # haiku 4.5: $1 in, $1.25 cache write, $0.10 cache read, $5 out; the batch halves everything
    expected = (1_000_000 * 1.0 + 100_000 * 1.25 + 200_000 * 0.10 + 100_000 * 5.0) / 1e6 * 0.5
    assert anthropic_cost(usage, 100_000, "claude-haiku-4-5-20251001") == pytest.approx(expected)
    assert anthropic_cost(usage, 0, "claude-haiku-4-5", {"claude-haiku-4-5": (2.0, 0.2, 10.0)}) == pytest.approx(
        (1_100_000 * 2.0 + 200_000 * 0.2 + 100_000 * 10.0) / 1e6 * 0.5)
    assert anthropic_cost(usage, 0, "unknown-model") is None
