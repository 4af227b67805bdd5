"""Azure's batch line format (``"url": "/chat/completions"``) next to OpenAI's (``/v1/chat/completions``), and
each backend's own endpoints (vLLM's ``/score`` and ``/rerank`` spellings)."""

from __future__ import annotations

import io
import re

import orjson
import pytest

from airflow_provider_synth.batch.errors import InvalidRequestsError
from airflow_provider_synth.batch.requests import (
    ENDPOINTS,
    OPENAI_ENDPOINTS,
    RERANK,
    SCORE,
    VLLM_ENDPOINTS,
    build_requests,
    canonical_url,
    scoring_pairs,
    service_url,
)
from airflow_provider_synth.batch.split import split_requests
from airflow_provider_synth.batch.validate import validate_requests

BODIES = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/embeddings": {"model": "m", "input": "hi"},
    "/v1/responses": {"model": "m", "input": "hi"},
    "/v1/completions": {"model": "m", "prompt": "hi"},
    "/v1/moderations": {"model": "omni-moderation-latest", "input": "hi"},
}


def line(i: int, url: str) -> dict:
    return {"custom_id": f"r{i}", "method": "POST", "url": url, "body": BODIES[canonical_url(url) or url]}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_both_forms_validate_for_every_endpoint(endpoint: str) -> None:
    azure = endpoint.removeprefix("/v1")
    summary = validate_requests([line(0, azure), line(1, endpoint), line(2, azure)])
    assert summary.total == 3 and summary.endpoint == endpoint
    assert service_url(endpoint, "azure") == azure and service_url(azure, "openai") == endpoint


def test_unknown_urls_and_mixed_endpoints_are_still_refused() -> None:
    with pytest.raises(InvalidRequestsError) as err:
        validate_requests([line(0, "/chat/completions"), {**line(1, "/v1/chat/completions"), "url": "/v2/chat"},
                           {**line(2, "/embeddings")}])
    reasons = [p.reason for p in err.value.problems]
    assert any("unsupported url '/v2/chat'" in r for r in reasons)
    assert any("differs from the batch's endpoint" in r for r in reasons)


@pytest.mark.parametrize(("form", "url"), [("openai", "/v1/chat/completions"), ("azure", "/chat/completions")])
def test_split_writes_every_line_in_the_services_form(form: str, url: str) -> None:
    lines = [line(i, "/chat/completions" if i % 2 else "/v1/chat/completions") for i in range(50)]
    shards: list[io.BytesIO] = []

    def open_shard(i: int) -> io.BytesIO:
        shards.append(NoClose())
        return shards[-1]

    result = split_requests(lines, open_shard, url_form=form)  # type: ignore[arg-type]
    written = [orjson.loads(x) for s in shards for x in s.getvalue().splitlines()]
    assert result.total == 50 and result.endpoint == "/v1/chat/completions"
    assert [w["custom_id"] for w in written] == [f"r{i}" for i in range(50)]
    assert {w["url"] for w in written} == {url}
    assert [w["body"] for w in written] == [x["body"] for x in lines]


class NoClose(io.BytesIO):
    def close(self) -> None:
        pass


# ------------------------------------------------------------------------- per-backend endpoint sets


@pytest.mark.parametrize(("url", "openai", "vllm"), [
    ("/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions"),
    ("/chat/completions", "/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/responses", "/v1/responses", None),
    ("/v1/score", None, "/v1/score"),
    ("/score", None, "/v1/score"),
    ("/rerank", None, "/v1/rerank"),
    ("/v1/rerank", None, "/v1/rerank"),
    ("/v2/rerank", None, "/v1/rerank"),
    ("/v2/score", None, None),
    ("/bad_url", None, None),
])
def test_each_backend_names_its_own_endpoints(url: str, openai: str | None, vllm: str | None) -> None:
    assert canonical_url(url) == canonical_url(url, OPENAI_ENDPOINTS) == openai
    assert canonical_url(url, VLLM_ENDPOINTS) == vllm


def test_the_batch_apis_refuse_vllms_scoring_endpoints_naming_the_line() -> None:
    rows = [{"custom_id": "s", "method": "POST", "url": "/v1/score",
             "body": {"model": "m", "text_1": "a", "text_2": "b"}},
            {"custom_id": "r", "method": "POST", "url": "/rerank",
             "body": {"model": "m", "query": "a", "documents": ["b"]}}]
    with pytest.raises(InvalidRequestsError) as info:
        validate_requests(rows, name="in.jsonl")
    assert [(p.line, p.custom_id) for p in info.value.problems] == [(1, "s"), (2, "r")]
    assert "in.jsonl:1 custom_id='s': unsupported url '/v1/score' (VLLMBatchOperator serves it)" in str(info.value)
    with pytest.raises(InvalidRequestsError, match="unsupported url '/v1/score'"):
        split_requests(rows, lambda i: io.BytesIO())
    assert validate_requests(rows[:1], endpoints=VLLM_ENDPOINTS).endpoint == SCORE


@pytest.mark.parametrize(("url", "body", "reason"), [
    ("/v1/rerank", {"documents": ["a"]}, "a rerank body needs query and documents"),
    ("/v1/rerank", {"query": "q", "documents": []}, "cannot pair 1 quer(ies) with 0 document(s)"),
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "cannot pair 2 quer(ies) with 3"),
    ("/v1/score", {"text_2": "a"}, "a score body needs text_1 and text_2"),
    ("/v1/score", {"text_1": "a", "text_2": None}, "a score or rerank text is null"),
])
def test_scoring_bodies_are_checked_before_the_engine_starts(url: str, body: dict, reason: str) -> None:
    row = {"custom_id": "x", "method": "POST", "url": url, "body": {"model": "m", **body}}
    with pytest.raises(InvalidRequestsError, match=re.escape(reason)):
        validate_requests([row], endpoints=VLLM_ENDPOINTS)


@pytest.mark.parametrize("body", [
    {"text_1": "a", "text_2": "b"}, {"text_1": "a", "text_2": ["b", "c"]}, {"text_1": ["a", "b"], "text_2": ["c", "d"]},
    {"queries": ["a"], "documents": ["b", "c"]}, {"queries": "a", "items": ["b"]}, {"data_1": "a", "data_2": "b"},
])
def test_every_pairing_vllm_serves_is_valid(body: dict) -> None:
    lefts, rights = scoring_pairs(SCORE, body)
    assert len(lefts) == len(rights) >= 1
    row = {"custom_id": "x", "method": "POST", "url": "/score", "body": {"model": "m", **body}}
    assert validate_requests([row], endpoints=VLLM_ENDPOINTS).total == 1


def test_scoring_requests_build_from_records() -> None:
    records = [{"id": "q1", "query": "fox", "documents": ["a fox", "a dog"], "other": 1}]
    [line] = build_requests(records, model="rr", endpoint=RERANK, id_field="id", params={"top_n": 1})
    assert line == {"custom_id": "q1", "method": "POST", "url": RERANK,
                    "body": {"model": "rr", "query": "fox", "documents": ["a fox", "a dog"], "top_n": 1}}
    [line] = build_requests([{"text_1": "a", "text_2": "b"}], model="rr", endpoint=SCORE)
    assert line["body"] == {"model": "rr", "text_1": "a", "text_2": "b"}
    for spelling in ("/rerank", "/v2/rerank"):  # run_batch's spellings name the same endpoint
        [line] = build_requests(records, model="rr", endpoint=spelling, id_field="id")
        assert line["url"] == RERANK and line["body"]["query"] == "fox"
    with pytest.raises(ValueError, match="unsupported endpoint '/v3/rerank'"):
        list(build_requests(records, model="rr", endpoint="/v3/rerank"))
    with pytest.raises(ValueError, match="give a builder or the fields query, documents"):
        list(build_requests([{"text": "x"}], model="rr", endpoint=RERANK))
