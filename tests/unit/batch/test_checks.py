from __future__ import annotations

import io

import orjson
import pydantic
import pytest

from airflow_provider_synth.batch import ShardOutputs, merge_shards, pending_requests
from airflow_provider_synth.batch.checks import OutputChecks, retry_line
from airflow_provider_synth.batch.extract import extract_parsed, iter_parsed
from airflow_provider_synth.batch.results import error_line, success_line


class Quiz(pydantic.BaseModel):
    question: str
    answer: str
    level: int


def req(cid: str, **body: object) -> bytes:
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q"}], **body}})


def chat_line(cid: str, content: str | None, finish: str = "stop", refusal: str | None = None,
              tokens: tuple[int, int] = (10, 5)) -> bytes:
    body = {"choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content, "refusal": refusal}}],
            "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1], "total_tokens": sum(tokens)}}
    return success_line(cid, body)


GOOD = '{"question": "2+2?", "answer": "4", "level": 1}'


def src(*lines: bytes):
    data = b"\n".join(lines) + b"\n"
    return lambda: io.BytesIO(data)


def merge(requests: list[bytes], outputs: list, checks: OutputChecks | None):
    rf, ff = io.BytesIO(), io.BytesIO()
    acct = merge_shards([ShardOutputs(src(*requests), outputs)], rf, ff, checks)
    rows = [orjson.loads(x) for x in rf.getvalue().splitlines()]
    fails = [orjson.loads(x) for x in ff.getvalue().splitlines()]
    return acct, rows, fails


def test_no_checks_keeps_every_200_and_reports_no_checks_section() -> None:
    acct, rows, fails = merge([req("a"), req("b")], [src(chat_line("a", "x", "length"), chat_line("b", GOOD))],
                              None)
    assert [r["custom_id"] for r in rows] == ["a", "b"] and fails == []
    assert "checks" not in acct.as_dict() and "parsed" not in rows[1]


def test_each_kind_goes_to_failures_with_reason_text_and_usage() -> None:
    checks = OutputChecks(finish_reasons={"length", "content_filter"}, refusal=True, schema=Quiz)
    outs = src(chat_line("ok", GOOD), chat_line("cut", '{"question": "2+', "length", tokens=(10, 100)),
               chat_line("filtered", None, "content_filter"), chat_line("no", None, refusal="I can't help"),
               chat_line("bad", '{"question": "x"}', tokens=(10, 7)), chat_line("prose", "Sure! Here it is"))
    acct, rows, fails = merge([req(c) for c in ("ok", "cut", "filtered", "no", "bad", "prose")], [outs], checks)
    assert [r["custom_id"] for r in rows] == ["ok"]
    assert rows[0]["parsed"] == {"question": "2+2?", "answer": "4", "level": 1}
    codes = {f["custom_id"]: f["error"]["code"] for f in fails}
    assert codes == {"cut": "truncated", "filtered": "refused", "no": "refused", "bad": "schema_invalid",
                     "prose": "schema_invalid"}
    cut = next(f for f in fails if f["custom_id"] == "cut")
    assert cut["text"] == '{"question": "2+' and cut["status_code"] == 200 and cut["retryable"] is True
    assert "finish_reason 'length'" in cut["error"]["message"]
    assert cut["response"]["body"]["usage"]["completion_tokens"] == 100
    bad = next(f for f in fails if f["custom_id"] == "bad")
    assert "Quiz" in bad["error"]["message"] and bad["text"] == '{"question": "x"}'
    assert next(f for f in fails if f["custom_id"] == "no")["text"] == "I can't help"
    m = acct.as_dict()
    assert (m["succeeded"], m["failed"], m["total"]) == (1, 5, 6)
    assert m["checks"]["truncated"] == 1 and m["checks"]["refused"] == 2 and m["checks"]["schema_invalid"] == 2
    assert m["checks"]["usage"]["completion_tokens"] == 100 + 5 + 5 + 7 + 5 and m["checks"]["usage"]["requests"] == 5
    assert m["usage"]["completion_tokens"] == 5  # results' usage: only the usable answer
    assert m["error_codes"] == {"truncated": 1, "refused": 2, "schema_invalid": 2}


def test_later_round_replaces_unusable_answer_and_counts_the_round() -> None:
    checks = OutputChecks(finish_reasons={"length"}, schema=Quiz)
    round0 = src(chat_line("a", '{"q', "length"), chat_line("b", GOOD), chat_line("c", "{}"))
    round1 = src(chat_line("a", GOOD), chat_line("c", "{}"))
    rf, ff = io.BytesIO(), io.BytesIO()
    acct = merge_shards([ShardOutputs(src(req("a"), req("b"), req("c")), [round0, round1], rounds=[0, 1])], rf, ff,
                        checks)
    assert [orjson.loads(x)["custom_id"] for x in rf.getvalue().splitlines()] == ["a", "b"]
    (fail,) = [orjson.loads(x) for x in ff.getvalue().splitlines()]
    assert fail["custom_id"] == "c" and fail["attempts"] == 2 and fail["error"]["code"] == "schema_invalid"
    c = acct.as_dict()["checks"]
    assert (c["truncated"], c["schema_invalid"], c["retried"], c["rounds"], c["unusable"]) == (1, 2, 2, 1, 3)


def test_pending_requests_retries_unusable_alone_with_the_declared_body() -> None:
    checks = OutputChecks(finish_reasons={"length"}, schema=Quiz,
                          retry_body={"truncated": {"max_completion_tokens": 999}})
    requests = src(req("a", max_completion_tokens=10), req("b"), req("c"), req("d"))
    outs = [src(chat_line("a", "{", "length"), chat_line("b", GOOD), chat_line("c", "nope"),
                error_line("d", "invalid_prompt", "bad", status_code=400))]
    out = io.BytesIO()
    n = pending_requests(requests, outs, out, retryable_only=True, checks=checks)
    lines = [orjson.loads(x) for x in out.getvalue().splitlines()]
    assert n == 2 and [x["custom_id"] for x in lines] == ["a", "c"]
    assert lines[0]["body"]["max_completion_tokens"] == 999 and "max_completion_tokens" not in lines[1]["body"]
    # without checks the same outputs need no retry but d's... which is not retryable
    assert pending_requests(requests, outs, io.BytesIO(), retryable_only=True) == 0
    # checks with retry=False: unusable answers are final failures
    assert pending_requests(requests, outs, io.BytesIO(), checks=OutputChecks(schema=Quiz, retry=False)) == 0


def test_json_schema_and_json_object_and_response_format_dicts() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    for given in (schema, fmt):
        acct, rows, fails = merge([req("a"), req("b")], [src(chat_line("a", '{"n": 3}'),
                                                             chat_line("b", '{"n": "3"}'))], OutputChecks(schema=given))
        assert [r["custom_id"] for r in rows] == ["a"] and rows[0]["parsed"] == {"n": 3}
        assert fails[0]["error"]["code"] == "schema_invalid" and "'3' is not of type 'integer'" in \
            fails[0]["error"]["message"]
    acct, rows, fails = merge([req("a"), req("b")], [src(chat_line("a", "{}"), chat_line("b", "[1]"))],
                              OutputChecks(schema={"type": "json_object"}, parsed=False))
    assert [r["custom_id"] for r in rows] == ["a"] and "parsed" not in rows[0] and len(fails) == 1


def test_responses_api_incomplete_and_refusal_parts() -> None:
    def resp_line(cid: str, status: str, parts: list, reason: str | None = None) -> bytes:
        body = {"object": "response", "status": status,
                "incomplete_details": {"reason": reason} if reason else None,
                "output": [{"type": "message", "content": parts}], "usage": {"input_tokens": 3, "output_tokens": 4}}
        return success_line(cid, body)

    outs = src(resp_line("a", "completed", [{"type": "output_text", "text": "fine"}]),
               resp_line("b", "incomplete", [{"type": "output_text", "text": "cut"}], "max_output_tokens"),
               resp_line("c", "completed", [{"type": "refusal", "refusal": "no"}]))
    acct, rows, fails = merge([req("a"), req("b"), req("c")], [outs],
                              OutputChecks(finish_reasons={"length"}, refusal=True))
    assert [r["custom_id"] for r in rows] == ["a"]
    assert [(f["custom_id"], f["error"]["code"]) for f in fails] == [("b", "truncated"), ("c", "refused")]
    assert acct.as_dict()["checks"]["usage"]["completion_tokens"] == 8


def test_embeddings_pass_any_checks() -> None:
    line = success_line("e", {"object": "list", "data": [{"embedding": [0.1], "index": 0}]})
    acct, rows, fails = merge([req("e")], [src(line)], OutputChecks(finish_reasons={"length"}, refusal=True))
    assert len(rows) == 1 and not fails


def test_extract_parsed_reads_the_parsed_object(tmp_path) -> None:
    checks = OutputChecks(schema=Quiz)
    path = tmp_path / "results.jsonl"
    rf, ff = io.BytesIO(), io.BytesIO()
    merge_shards([ShardOutputs(src(req("a"), req("b")), [src(chat_line("a", GOOD), chat_line("b", GOOD))])], rf, ff,
                 checks)
    path.write_bytes(rf.getvalue())
    (first, second) = list(iter_parsed(path, Quiz))
    assert first == ("a", Quiz(question="2+2?", answer="4", level=1)) and second[0] == "b"
    assert extract_parsed(orjson.loads(chat_line("x", GOOD))) == {"question": "2+2?", "answer": "4", "level": 1}
    assert extract_parsed({"custom_id": "y", "parsed": {"question": "q", "answer": "a", "level": 2}}, Quiz).level == 2


def test_retry_line_changes_and_removes_fields() -> None:
    line = orjson.loads(retry_line(req("a", max_tokens=5, temperature=1.0), {"max_tokens": None,
                                                                            "max_completion_tokens": 50}))
    assert line["body"]["max_completion_tokens"] == 50 and "max_tokens" not in line["body"]
    assert line["custom_id"] == "a" and line["body"]["temperature"] == 1.0


def test_checks_arguments_are_checked() -> None:
    with pytest.raises(TypeError):
        OutputChecks(finish_reasons="length")
    with pytest.raises(ValueError):
        OutputChecks(direct_tail=-1)
    with pytest.raises(TypeError):
        OutputChecks(schema=42).checker()
    assert OutputChecks().checker() is None and not OutputChecks(direct_tail=5).active


def test_sum_checks_adds_shards_up() -> None:
    from airflow_provider_synth.batch.checks import sum_checks

    a = {"truncated": 2, "refused": 0, "schema_invalid": 1, "unusable": 3, "retried": 1, "rounds": 1,
         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "requests": 3}, "cost_usd": 0.25}
    b = {**a, "truncated": 1, "unusable": 2, "rounds": 2, "cost_usd": 0.5}
    total = sum_checks([a, b])
    assert total is not None and (total["truncated"], total["unusable"], total["rounds"]) == (3, 5, 2)
    assert total["usage"]["prompt_tokens"] == 20 and total["usage"]["requests"] == 6 and total["cost_usd"] == 0.75
    assert sum_checks([]) is None


def test_text_response_format_validates_nothing_and_n_choices_are_all_checked() -> None:
    acct, rows, fails = merge([req("a")], [src(chat_line("a", "plain words"))],
                              OutputChecks(schema={"type": "text"}, finish_reasons={"length"}))
    assert len(rows) == 1 and "parsed" not in rows[0] and not fails
    two = success_line("b", {"choices": [
        {"index": 0, "finish_reason": "stop", "message": {"content": GOOD}},
        {"index": 1, "finish_reason": "stop", "message": {"content": GOOD.replace("4", "5")}}]})
    acct, rows, fails = merge([req("b")], [src(two)], OutputChecks(schema=Quiz))
    assert [p["answer"] for p in rows[0]["parsed"]] == ["4", "5"]
    bad = two.replace(b'"level\\": 1}"}}]', b'"level\\": \\"x\\"}"}}]')
    assert bad != two
    acct, rows, fails = merge([req("b")], [src(bad)], OutputChecks(schema=Quiz))
    assert not rows and fails[0]["error"]["code"] == "schema_invalid"


# -- the one default of checks beside a response_format (issue 21) ------------------------------------------

def test_a_schema_the_user_wrote_is_checked_without_checks() -> None:
    """On the old main a template's response_format validated nothing unless checks= was set, while
    OutputChecks() (documented as "checks nothing") did validate against it."""
    import pydantic

    from airflow_provider_synth.batch.checks import OutputChecks, checks_for

    class Item(pydantic.BaseModel):
        q: str

    assert checks_for(None, Item) == OutputChecks(schema=Item)
    assert checks_for(OutputChecks(refusal=True), Item) == OutputChecks(refusal=True, schema=Item)
    assert checks_for(OutputChecks(schema={"type": "object"}), Item).schema == {"type": "object"}  # given wins
    assert checks_for(None, None) is None and checks_for(OutputChecks(), None) == OutputChecks()
    off = checks_for(OutputChecks(schema=False), Item)
    assert off == OutputChecks() and not off.active and off.checker() is None
    assert OutputChecks(schema=False, refusal=True).to_spec()["schema"] is None


def test_the_default_is_the_same_for_every_backend_that_takes_a_template() -> None:
    import pydantic

    from airflow_provider_synth.batch.requests import RequestTemplate
    from airflow_provider_synth.decorators.cortex import CortexBatchDecoratedOperator
    from airflow_provider_synth.decorators.vllm import VLLMBatchDecoratedOperator
    from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator

    class Item(pydantic.BaseModel):
        q: str

    template = RequestTemplate(prompt_template="{x}", response_format=Item)
    ops = [OpenAIBatchOperator(task_id="o", output_path="/tmp/x", requests=[{"x": 1}], model="m", template=template),
           VLLMBatchDecoratedOperator(task_id="v", python_callable=lambda: [], output_path="/tmp/x", model="m",
                                  template=template),
           CortexBatchDecoratedOperator(task_id="c", python_callable=lambda: [], output_path="/tmp/x", model="m",
                                    template=template)]
    assert [op.checks.schema for op in ops] == [Item, Item, Item]
