"""OpenAI chat bodies -> Cortex arguments, request-file checks, answers back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_provider_synth.batch.errors import InvalidRequestsError
from airflow_provider_synth.runs import cortex_mapping as cortex


def _body(messages: list[dict], **params: object) -> dict:
    return {"model": "llama3.1-8b", "messages": messages, **params}


def _line(cid: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


USER = [{"role": "user", "content": "Hi"}]


def test_single_user_message_maps_to_prompt_with_parameters_and_schema():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    call = cortex.map_chat_body("r1", _body(USER, temperature=0.2, top_p=0.9, max_completion_tokens=64,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "x", "schema": schema}},
                                            user="u-1", seed=3))
    assert call.mode == "prompt"
    assert call.prompt == "Hi"
    assert call.model_parameters == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 64}
    assert call.response_format == {"type": "json", "schema": schema}
    assert cortex.staging_row(7, call) == ("r1", 7, "Hi", None, '{"temperature":0.2,"top_p":0.9,"max_tokens":64}',
                                           json.dumps(call.response_format, separators=(",", ":")))


def test_system_and_turns_map_to_conversation_with_options():
    msgs = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": [{"type": "text", "text": "a"},
            {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "c"}]
    call = cortex.map_chat_body("r2", _body(msgs, max_tokens=10))
    assert call.mode == "conversation"
    assert call.conversation == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "a\nb"},
                                 {"role": "assistant", "content": "ok"}, {"role": "user", "content": "c"}]
    row = cortex.staging_row(1, call)
    assert row[2] is None and json.loads(row[3]) == call.conversation and json.loads(row[4]) == {"max_tokens": 10}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (_body([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "image_url"),
        (_body(USER, tools=[{"type": "function", "function": {"name": "f"}}]), "body.tools"),
        (_body(USER, n=2), "body.n=2"),
        (_body(USER, temperature=1.5), "temperature=1.5"),
        (_body(USER, top_p=-0.1), "top_p"),
        (_body(USER, max_tokens=0), "max_tokens must be a positive integer"),
        (_body(USER, logprobs=True), "logprobs"),
        (_body(USER, stop=["\n"]), "body.stop"),
        (_body(USER, response_format={"type": "json_object"}), "needs a JSON schema"),
        (_body(USER, frobnicate=1), "body.frobnicate has no Cortex"),
        (_body([{"role": "tool", "content": "x", "tool_call_id": "t"}]), "role 'tool'"),
        (_body([{"role": "assistant", "content": "x"}]), "alternate user/assistant"),
        (_body([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]), "system message may only"),
        (_body([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "last message"),
        (_body([{"role": "user", "content": "   "}]), "content is empty"),
        (_body([]), "non-empty list"),
    ],
)
def test_bodies_cortex_cannot_take_are_refused_with_a_reason(body, needle):
    with pytest.raises(cortex.CortexMappingError) as err:
        cortex.map_chat_body("x", body)
    assert any(needle in r for r in err.value.reasons), err.value.reasons


def test_check_requests_names_file_line_and_custom_id_of_every_problem(tmp_path: Path):
    path = tmp_path / "requests.jsonl"
    lines = [
        _line("ok-1", _body(USER)),
        "{not json",
        _line("img", _body([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}])),
        "",
        _line("ok-1", _body(USER)),
        _line("emb", {"model": "m", "input": "x"}, url="/v1/embeddings"),
        _line("hot", _body(USER, temperature=2)),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidRequestsError) as err:
        cortex.check_requests(path)
    found = {(p.line, p.custom_id) for p in err.value.problems}
    assert {(2, None), (3, "img"), (5, "ok-1"), (7, "hot")} <= found
    assert any(p.line == 6 for p in err.value.problems)
    text = str(err.value)
    assert f"{path}:3 custom_id='img'" in text and "duplicate custom_id (first used on line 1)" in text


def test_check_requests_accepts_a_good_file_and_fingerprints_it(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    path.write_text(_line("a", _body(USER)) + "\n" + _line("b", _body([{"role": "system", "content": "s"}, *USER])) + "\n")
    check = cortex.check_requests(path)
    assert (check.total, check.model, check.conversations) == (2, "llama3.1-8b", 1)
    assert check.fingerprint == cortex.check_requests(path).fingerprint
    path.write_text(path.read_text().replace("Hi", "Ho"))
    assert cortex.check_requests(path).fingerprint != check.fingerprint
    assert [seq for seq, _ in cortex.iter_calls(path)] == [1, 2]


def test_check_model_knows_cortex_models_and_takes_extras():
    assert cortex.check_model("mistral-large2") == "mistral-large2"
    with pytest.raises(ValueError, match="not a Cortex model.*did you mean"):
        cortex.check_model("llama3.1-9000b")
    with pytest.raises(ValueError, match="not a Cortex model"):
        cortex.check_model("gpt-4o-mini")
    assert cortex.check_model("my-tuned.v2", {"my-tuned.v2"}) == "my-tuned.v2"
    with pytest.raises(ValueError):
        cortex.check_model("x'); DROP TABLE t; --", {"x'); DROP TABLE t; --"})
    with pytest.raises(ValueError):
        cortex.check_model("tuned\n", {"tuned\n"})
    with pytest.raises(ValueError, match="no model"):
        cortex.check_model(None)


def test_table_parameters_map_like_a_body():
    assert cortex.table_parameters({"temperature": 0.1}, conversation=False) == ('{"temperature":0.1}', None)
    rf = {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}
    params, fmt = cortex.table_parameters({"response_format": rf}, conversation=True)
    assert json.loads(params) == {"response_format": {"type": "json", "schema": {"type": "object"}}} and fmt is None
    with pytest.raises(cortex.CortexMappingError):
        cortex.table_parameters({"temperature": 3}, conversation=False)


def test_table_problems_list_every_issue():
    with pytest.raises(InvalidRequestsError) as err:
        cortex.table_problems("DB.S.T", {"rows": 5, "null_ids": 1, "empty_inputs": 2}, [("a", 2)])
    reasons = [p.reason for p in err.value.problems]
    assert reasons == ["1 row(s) have a NULL id", "2 row(s) have a NULL or empty prompt", "duplicate id (2 rows)"]
    assert err.value.problems[-1].custom_id == "a"
    cortex.table_problems("T", {"rows": 1, "null_ids": 0, "empty_inputs": 0}, [])


def test_classify_rows_of_both_call_shapes():
    details = {"choices": [{"messages": "hello"}], "created": 5, "model": "m",
               "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "guard_tokens": 1}}
    ok = cortex.classify_row("a", True, json.dumps({"value": details, "error": None}), "llama3.1-8b")
    assert ok.error is None and ok.body is not None
    assert ok.body["choices"][0]["message"] == {"role": "assistant", "content": "hello", "refusal": None}
    assert ok.body["usage"]["total_tokens"] == 5 and ok.body["usage"]["guard_tokens"] == 1
    conv = cortex.classify_row("b", True, json.dumps(json.dumps(details)), "m")
    assert conv.body is not None and conv.body["model"] == "m"
    structured = cortex.classify_row("s", True, json.dumps({"value": {"choices": [{"messages": {"a": 1}}]}}), "m")
    assert structured.body is not None and structured.body["choices"][0]["message"]["content"] == '{"a":1}'
    err = cortex.classify_row("c", True, json.dumps({"value": None, "error": "too long"}), "m")
    assert err.error == ("cortex_error", "too long") and not err.missing
    null = cortex.classify_row("d", True, None, "m")
    assert null.error is not None and "TRY_COMPLETE" in null.error[1]
    missing = cortex.classify_row("e", False, None, "m")
    assert missing.missing and missing.error is not None and missing.error[0] == "missing"
