from __future__ import annotations

import io
import random

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_synth.batch import (
    InvalidRequestsError,
    ShardLimits,
    ShardOutputs,
    merge_shards,
    pending_requests,
    split_requests,
)
from airflow_provider_synth.batch.results import error_line, success_line


def chat(cid: str, text: str = "hi") -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}}


def body(cid: str, prompt: int = 10, completion: int = 5, cached: int = 0, reasoning: int = 0) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {cid}"}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                      "prompt_tokens_details": {"cached_tokens": cached},
                      "completion_tokens_details": {"reasoning_tokens": reasoning}}}


def ids_of(data: bytes) -> list[str]:
    return [orjson.loads(x)["custom_id"] for x in data.splitlines() if x.strip()]


def test_split_respects_each_limit(sink) -> None:
    reqs = [chat(f"r{i}", "x" * (i % 7) * 50) for i in range(100)]
    limits = ShardLimits(max_requests=30, max_bytes=4000)
    res = split_requests(reqs, sink.open, limits=limits)
    assert res.total == 100 and sum(s.requests for s in res.shards) == 100
    for s in res.shards:
        assert s.requests <= 30 and s.bytes <= 4000 and len(sink.data[s.index]) == s.bytes
    assert [c for s in res.shards for c in ids_of(sink.data[s.index])] == [r["custom_id"] for r in reqs]
    assert res.fingerprint == split_requests(reqs, sink.open, limits=limits).fingerprint


def test_split_embedding_inputs_and_tokens(sink) -> None:
    reqs = [{"custom_id": str(i), "method": "POST", "url": "/v1/embeddings",
             "body": {"model": "text-embedding-3-small", "input": ["a"] * 4}} for i in range(10)]
    res = split_requests(reqs, sink.open, limits=ShardLimits(max_embedding_inputs=10))
    assert [s.embedding_inputs for s in res.shards] == [8, 8, 8, 8, 8]
    res = split_requests([chat(str(i), "word " * 40) for i in range(10)], sink.open,
                         limits=ShardLimits(max_tokens=150))
    assert all(0 < s.est_tokens <= 150 for s in res.shards) and res.est_input_tokens > 0


def test_split_reports_oversized_request_for_limits(sink) -> None:
    reqs = [{"custom_id": "big", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": "e", "input": ["a"] * 20}}]
    with pytest.raises(InvalidRequestsError, match="20 embedding inputs, over"):
        split_requests(reqs, sink.open, limits=ShardLimits(max_embedding_inputs=10))
    with pytest.raises(InvalidRequestsError, match="over the per-shard limit"):
        split_requests([chat("x", "y" * 500)], sink.open, limits=ShardLimits(max_bytes=100))


def test_merge_real_world_shapes(sink) -> None:
    reqs = [chat(f"c{i}") for i in range(8)]
    res = split_requests(reqs, sink.open, limits=ShardLimits(max_requests=4))
    tool_body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
        {"id": "t2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    round0 = [
        [success_line("c0", body("c0", cached=4, reasoning=2)), success_line("c1", tool_body),
         error_line("c2", "rate_limit_exceeded", "slow down", status_code=429),
         orjson.dumps({"id": "x", "custom_id": "c3", "response": {"status_code": 400, "request_id": "r",
                       "body": {"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}}},
                       "error": None})],
        [error_line("c4", "batch_expired", "expired"), success_line("c5", body("c5")),
         success_line("c5", body("c5")),  # duplicate success
         success_line("zz", body("zz"))],  # unknown id; c6 and c7 missing
    ]
    for lines in round0:
        random.Random(1).shuffle(lines)
    retry = [[success_line("c2", body("c2"))], [success_line("c4", body("c4")), error_line("c6", "x", "y", status_code=503)]]
    shards = [ShardOutputs(sink.opener(i), [lambda d=b"\n".join(round0[i]): io.BytesIO(d),
                                            lambda d=b"\n".join(retry[i]): io.BytesIO(d)]) for i in range(2)]
    results, failures = io.BytesIO(), io.BytesIO()
    acct = merge_shards(shards, results, failures)
    assert ids_of(results.getvalue()) == ["c0", "c1", "c2", "c4", "c5"]
    fails = [orjson.loads(x) for x in failures.getvalue().splitlines()]
    assert [f["custom_id"] for f in fails] == ["c3", "c6", "c7"]
    assert fails[0]["error"]["code"] == "400" and fails[0]["retryable"] is False
    assert fails[1]["status_code"] == 503 and fails[1]["retryable"] and fails[1]["attempts"] == 1
    assert fails[2]["error"]["code"] == "missing" and fails[2]["attempts"] == 0
    assert (acct.total, acct.succeeded, acct.failed, acct.missing) == (8, 5, 2, 1)
    assert acct.duplicates == 1 and acct.unknown == 1 and acct.unknown_examples == ["zz"]
    assert acct.usage.cached_tokens == 4 and acct.usage.reasoning_tokens == 2 and acct.usage.requests == 5
    assert acct.usage.prompt_tokens == 10 + 3 + 10 + 10 + 10  # the unknown id's usage is not this run's
    assert res.total == 8


def test_pending_requests_only_retryable_and_unfinished(sink) -> None:
    reqs = [chat(f"p{i}") for i in range(5)]
    split_requests(reqs, sink.open)
    out = b"\n".join([success_line("p0", body("p0")), error_line("p1", "batch_expired", "e"),
                      error_line("p2", "invalid", "bad", status_code=400),
                      error_line("p3", "batch_cancelled", "c")])
    buf = io.BytesIO()
    n = pending_requests(sink.opener(0), [lambda: io.BytesIO(out)], buf)
    assert n == 2 and ids_of(buf.getvalue()) == ["p1", "p4"]


def test_legacy_vllm_response_shape_is_normalized(sink) -> None:
    split_requests([chat("v1")], sink.open)
    legacy = orjson.dumps({"id": "vllm-1", "custom_id": "v1", "response": {
        "id": "cmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "hello"}}], "usage": {"prompt_tokens": 25, "completion_tokens": 31,
                                                                  "total_tokens": 56}}, "error": None})
    results = io.BytesIO()
    acct = merge_shards([ShardOutputs(sink.opener(0), [lambda: io.BytesIO(legacy)])], results, io.BytesIO())
    line = orjson.loads(results.getvalue())
    assert line["response"]["status_code"] == 200 and line["response"]["body"]["object"] == "chat.completion"
    assert acct.usage.prompt_tokens == 25


outcome = st.sampled_from(["ok", "ok", "ok", "fail", "retry_fail", "missing", "dup", "late_ok"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 60), max_requests=st.integers(1, 20), max_bytes=st.integers(200, 2000),
       outcomes=st.lists(outcome, min_size=60, max_size=60), seed=st.integers(0, 1000),
       texts=st.lists(st.text(max_size=40), min_size=60, max_size=60))
def test_property_split_then_merge_keeps_every_request_once(sink, n, max_requests, max_bytes, outcomes, seed,
                                                            texts) -> None:
    reqs = [chat(f"id-{i}", texts[i]) for i in range(n)]
    limits = ShardLimits(max_requests=max_requests, max_bytes=max_bytes)
    try:
        res = split_requests(reqs, sink.open, limits=limits)
    except InvalidRequestsError as exc:  # a single request larger than max_bytes
        assert all("over the per-shard limit" in p.reason for p in exc.problems)
        return
    for s in res.shards:
        assert s.requests <= max_requests and s.bytes <= max_bytes
    rng = random.Random(seed)
    shards, expect_ok = [], []
    for s in res.shards:
        r0, r1 = [], []
        for cid in ids_of(sink.data[s.index]):
            o = outcomes[int(cid.split("-")[1])]
            if o in ("ok", "dup"):
                r0.append(success_line(cid, body(cid)))
                expect_ok.append(cid)
            if o == "dup":
                r1.append(success_line(cid, body(cid)))
            if o == "fail":
                r0.append(error_line(cid, "invalid", "no", status_code=400))
            if o == "retry_fail":
                r0.append(error_line(cid, "server_error", "no", status_code=500))
                r1.append(error_line(cid, "batch_expired", "no"))
            if o == "late_ok":
                r0.append(error_line(cid, "server_error", "no", status_code=500))
                r1.append(success_line(cid, body(cid)))
                expect_ok.append(cid)
        rng.shuffle(r0)
        rng.shuffle(r1)
        shards.append(ShardOutputs(sink.opener(s.index), [lambda d=b"\n".join(r0): io.BytesIO(d),
                                                          lambda d=b"\n".join(r1): io.BytesIO(d)]))
    results, failures = io.BytesIO(), io.BytesIO()
    acct = merge_shards(shards, results, failures)
    got_ok, got_fail = ids_of(results.getvalue()), ids_of(failures.getvalue())
    order = [r["custom_id"] for r in reqs]
    assert sorted(got_ok + got_fail, key=order.index) == order
    assert len(set(got_ok) | set(got_fail)) == n
    assert got_ok == [c for c in order if c in set(expect_ok)]
    assert acct.succeeded + acct.failed + acct.missing == acct.total == n
    assert acct.duplicates == sum(1 for i in range(n) if outcomes[i] == "dup")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 80), block=st.integers(50, 2000), max_requests=st.integers(1, 30),
       max_bytes=st.integers(300, 3000), blanks=st.lists(st.integers(0, 79), max_size=3),
       crlf=st.booleans())
def test_property_block_path_matches_line_path(sink, monkeypatch, n, block, max_requests, max_bytes, blanks,
                                               crlf) -> None:
    """Splitting a file read in blocks of any size gives the same shards as the request list."""
    from airflow_provider_synth.batch import jsonl

    reqs = [chat(f"b{i}", "t" * (i % 9) * 10) for i in range(n)]
    lines = [orjson.dumps(r) for r in reqs]
    for b in blanks:
        lines.insert(min(b, len(lines)), b"  ")
    data = (b"\r\n" if crlf else b"\n").join(lines) + b"\n"
    limits = ShardLimits(max_requests=max_requests, max_bytes=max_bytes)
    try:
        expected = split_requests(reqs, sink.open, limits=limits)
    except InvalidRequestsError:
        return
    want = [sink.data[s.index] for s in expected.shards]
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", block)
    got = split_requests(io.BytesIO(data), sink.open, limits=limits)
    assert [sink.data[s.index] for s in got.shards] == want
    assert got.fingerprint == expected.fingerprint and got.total == n
    assert [(s.first_custom_id, s.last_custom_id, s.requests) for s in got.shards] == [
        (s.first_custom_id, s.last_custom_id, s.requests) for s in expected.shards]


def test_block_path_reports_problems_with_exact_line_numbers(sink, monkeypatch) -> None:
    from airflow_provider_synth.batch import jsonl

    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 256)
    lines = [orjson.dumps(chat(f"x{i}")) for i in range(40)]
    lines[25] = b"{broken"
    lines[33] = orjson.dumps(chat("x3"))
    with pytest.raises(InvalidRequestsError) as info:
        split_requests(io.BytesIO(b"\n".join(lines) + b"\n"), sink.open)
    assert [(p.line, p.custom_id) for p in info.value.problems] == [(26, None), (34, "x3")]


def test_merge_counts_a_bad_output_line_with_file_and_line_and_lands_the_rest(sink) -> None:
    """One unreadable line never aborts the merge: the readable answers land, the line is counted (file and
    line), and the id left without an answer is a retryable ``output_unreadable`` failure."""
    split_requests([chat("m1"), chat("m2")], sink.open)
    out = success_line("m1", body("m1")) + b"\n\n{oops\n"

    class Named(io.BytesIO):
        name = "outputs/shard-0.jsonl"

    results, failures = io.BytesIO(), io.BytesIO()
    acct = merge_shards([ShardOutputs(sink.opener(0), [lambda: Named(out)])], results, failures)
    assert [orjson.loads(x)["custom_id"] for x in results.getvalue().splitlines()] == ["m1"]
    row = orjson.loads(failures.getvalue())
    assert (row["custom_id"], row["error"]["code"], row["retryable"]) == ("m2", "output_unreadable", True)
    data = acct.as_dict()
    assert data["unreadable"] == 1 and data["error_codes"] == {"output_unreadable": 1}
    assert [(b["file"], b["line"]) for b in data["unreadable_lines"]] == [("outputs/shard-0.jsonl", 3)]


def test_merge_names_the_id_of_a_cut_off_line_and_retries_only_what_is_unanswered(sink) -> None:
    """A cut-off line still names its custom_id: that id is the ``output_unreadable`` failure; the
    retry round asks for it again and for nothing that was answered."""
    split_requests([chat(f"c{i}") for i in range(4)], sink.open)
    cut = success_line("c2", body("c2"))
    out = b"\n".join([success_line("c0", body("c0")), b"<html>502 Bad Gateway</html>", cut[: len(cut) // 2],
                      success_line("c3", body("c3"))]) + b"\n"
    results, failures = io.BytesIO(), io.BytesIO()
    acct = merge_shards([ShardOutputs(sink.opener(0), [lambda: io.BytesIO(out)])], results, failures)
    assert (acct.succeeded, acct.failed, acct.missing, acct.unreadable) == (2, 2, 0, 2)
    rows = [orjson.loads(x) for x in failures.getvalue().splitlines()]
    assert [(r["custom_id"], r["error"]["code"]) for r in rows] == [("c1", "output_unreadable"),
                                                                   ("c2", "output_unreadable")]
    again = io.BytesIO()
    assert pending_requests(sink.opener(0), [lambda: io.BytesIO(out)], again) == 2
    assert [orjson.loads(x)["custom_id"] for x in again.getvalue().splitlines()] == ["c1", "c2"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 60), block=st.integers(40, 3000), blanks=st.lists(st.integers(0, 59), max_size=3),
       crlf=st.booleans(), seed=st.integers(0, 1000))
def test_property_merge_in_blocks_matches_line_by_line(sink, monkeypatch, n, block, blanks, crlf, seed) -> None:
    """Merging files read in blocks of any size (blank lines, CRLF, shuffled answers, failures, missing and
    Responses-API usage mixed in) gives exactly what one whole-file block gives."""
    from airflow_provider_synth.batch import jsonl

    rng = random.Random(seed)
    split_requests([chat(f"p{i}") for i in range(n)], sink.open)
    answers = []
    for i in range(n):
        r = rng.random()
        if r < 0.1:
            continue
        if r < 0.25:
            answers.append(error_line(f"p{i}", "server_error", "boom", status_code=500))
        elif r < 0.35:
            answers.append(success_line(f"p{i}", {"object": "response", "usage": {"input_tokens": 3,
                                                                                   "output_tokens": 2}}))
        else:
            answers.append(success_line(f"p{i}", body(f"p{i}", prompt=i, completion=1, cached=i % 3)))
    rng.shuffle(answers)
    for b in blanks:
        answers.insert(min(b, len(answers)), b"")
    nl = b"\r\n" if crlf else b"\n"
    out = nl.join(answers) + nl
    requests = nl.join(sink.data[0].splitlines()) + nl

    def merged() -> tuple[bytes, bytes, dict]:
        results, failures = io.BytesIO(), io.BytesIO()
        acct = merge_shards([ShardOutputs(lambda: io.BytesIO(requests), [lambda: io.BytesIO(out)])],
                            results, failures)
        return results.getvalue(), failures.getvalue(), acct.as_dict()

    want = merged()
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", block)
    assert merged() == want
    assert [orjson.loads(x)["custom_id"] for x in want[0].splitlines()] == sorted(
        {orjson.loads(a)["custom_id"] for a in answers if a and b'"status_code":200' in a},
        key=lambda c: int(c[1:]))


def test_merge_counts_two_objects_on_one_output_line_as_unreadable(sink) -> None:
    split_requests([chat("t1"), chat("t2")], sink.open)
    out = success_line("t1", body("t1")) + b" " + success_line("t2", body("t2")) + b"\n"
    acct = merge_shards([ShardOutputs(sink.opener(0), [lambda: io.BytesIO(out)])], io.BytesIO(), io.BytesIO())
    assert (acct.succeeded, acct.unreadable, acct.unreadable_lines[0].line) == (0, 1, 1)
    assert acct.error_codes["output_unreadable"] == 1 and acct.failed + acct.missing == 2
