"""invalid_requests="fail" | "skip": the one core decision every operator uses (split_requests + Rejected)."""

from __future__ import annotations

import io
import random

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_synth.batch import InvalidRequestsError, ShardOutputs, merge_shards, split_requests
from airflow_provider_synth.batch.results import success_line
from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.batch.validate import check_invalid_requests


def chat(cid: str, model: str = "tiny", **body: object) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": f"about {cid}"}], **body}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": b}


def rows_of(data: bytes) -> list[dict]:
    return [orjson.loads(x) for x in data.splitlines() if x.strip()]


class Rows(io.BytesIO):
    """A rejected-rows file whose bytes survive close()."""

    kept = b""

    def close(self) -> None:
        Rows.kept = self.getvalue()
        super().close()


# vLLM's and langbatch's own test inputs: one good line between each kind of bad one
RUN_BATCH_LINES = [
    orjson.dumps(chat("ok-1")),
    orjson.dumps(chat("bad-model", model="NonExistModel")),
    orjson.dumps({**chat("bad-url"), "url": "/bad_url"}),
    orjson.dumps(chat("bad-stream", stream="True")),
    orjson.dumps({"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "tiny"}}),
    orjson.dumps(chat("ok-2")),
    orjson.dumps({**chat("robot"), "body": {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}}),
    b'{"custom_id": "torn", "method": "POST", "url": "/v1/chat/compl',
    b"not json at all",
    orjson.dumps(chat("ok-1")),  # a duplicate id
    orjson.dumps(chat("ok-3", model="hub/tiny-id")),  # the second served name
]


def split_skip(data: bytes, sink, **kw: object):
    return split_requests(io.BytesIO(data), sink.open, invalid_requests="skip", open_rejected=Rows,
                          models=["tiny", "hub/tiny-id"], **kw)


def test_fail_refuses_naming_every_line(sink) -> None:
    with pytest.raises(InvalidRequestsError) as info:
        split_requests(io.BytesIO(b"\n".join(RUN_BATCH_LINES) + b"\n"), sink.open, models=["tiny", "hub/tiny-id"])
    lines = sorted({p.line for p in info.value.problems})
    assert lines == [2, 3, 4, 5, 7, 8, 9, 10]
    assert "model 'NonExistModel' is not served here" in str(info.value)


def test_skip_sends_the_valid_lines_and_sets_each_invalid_one_aside(sink) -> None:
    res = split_skip(b"\n".join(RUN_BATCH_LINES) + b"\n", sink)
    sent = [r["custom_id"] for s in res.shards for r in rows_of(sink.data[s.index])]
    assert sent == ["ok-1", "ok-2", "ok-3"]
    assert (res.total, res.invalid, res.synthetic_ids) == (11, 8, 2)
    rows = rows_of(Rows.kept)
    assert [(r["line"], r["custom_id"], r["status_code"]) for r in rows] == [
        (2, "bad-model", 404), (3, "bad-url", 400), (4, "bad-stream", 400), (5, "no-messages", 400),
        (7, "robot", 400), (8, "torn", 400), (9, "line-9", 400), (10, "line-10", 400)]
    by_id = {r["custom_id"]: r for r in rows}
    assert by_id["bad-model"]["error"]["code"] == "model_not_found"
    assert "served_model_names" in by_id["bad-model"]["error"]["message"]
    assert "unsupported url '/bad_url'" in by_id["bad-url"]["error"]["message"]
    assert "unknown message role(s) ['robot']" in by_id["robot"]["error"]["message"]
    assert by_id["line-9"]["synthetic_id"] and "no readable custom_id" in by_id["line-9"]["error"]["message"]
    assert "custom_id 'ok-1' is taken" in by_id["line-10"]["error"]["message"]
    assert all(not r["retryable"] and r["error"]["message"].startswith(f"line {r['line']}: ") for r in rows)

    # every input line exactly once in results or failures, the invalid ones counted as failed
    answers = b"\n".join(success_line(c, {"choices": [], "usage": {}}) for c in sent)
    results, failures = io.BytesIO(), io.BytesIO()
    acct = merge_shards([ShardOutputs(sink.opener(0), [lambda: io.BytesIO(answers)])], results, failures,
                        invalid=lambda: io.BytesIO(Rows.kept))
    ids = [r["custom_id"] for r in rows_of(results.getvalue()) + rows_of(failures.getvalue())]
    assert len(ids) == len(set(ids)) == 11
    assert (acct.total, acct.succeeded, acct.failed, acct.invalid, acct.synthetic_ids) == (11, 3, 8, 8, 2)
    assert acct.as_dict()["invalid"] == 8 and acct.error_codes["model_not_found"] == 1


def test_a_torn_line_and_a_good_one_never_both_answer_for_one_id(sink) -> None:
    torn = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/compl'
    res = split_skip(torn + b"\n" + orjson.dumps(chat("a")) + b"\n" + orjson.dumps(chat("b")) + b"\n", sink)
    assert [r["custom_id"] for r in rows_of(sink.data[0])] == ["b"]
    rows = rows_of(Rows.kept)
    assert [(r["custom_id"], r["line"]) for r in rows] == [("a", 1), ("line-2", 2)]
    assert res.invalid == 2 and "duplicate custom_id (first used on line 1)" in rows[1]["error"]["message"]


def test_skip_with_no_valid_line_left_refuses(sink) -> None:
    with pytest.raises(InvalidRequestsError, match="2 invalid request"):
        split_skip(b"not json\n" + orjson.dumps(chat("x", model="other")) + b"\n", sink)


def test_skip_needs_somewhere_to_put_the_rows(sink) -> None:
    with pytest.raises(ValueError, match="open_rejected"):
        split_requests([chat("a")], sink.open, invalid_requests="skip")
    with pytest.raises(ValueError, match="invalid_requests must be one of"):
        check_invalid_requests("ignore")


def test_without_served_models_one_file_still_serves_one_model(sink) -> None:
    res = split_requests([chat("a", model="m1"), chat("b", model="m2"), chat("c", model="m1")], sink.open,
                         invalid_requests="skip", open_rejected=Rows)
    assert [r["custom_id"] for r in rows_of(sink.data[0])] == ["a", "c"]
    assert res.invalid == 1 and "differs from the batch's model" in rows_of(Rows.kept)[0]["error"]["message"]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(["ok", "ok", "ok", "json", "model", "dup", "role", "blank"]), min_size=1,
                      max_size=70),
       block=st.integers(60, 3000), max_requests=st.integers(1, 25), seed=st.integers(0, 1000))
def test_property_skip_keeps_every_line_once_whatever_the_blocks(sink, monkeypatch, kinds, block, max_requests,
                                                                 seed) -> None:
    from airflow_provider_synth.batch import jsonl

    monkeypatch.setattr(jsonl, "BLOCK_BYTES", block)
    lines, valid, invalid_lines = [], [], []
    for i, kind in enumerate(kinds):
        if kind == "blank":
            lines.append(b"")
            continue
        cid = f"c{i}"
        if kind == "ok" or (kind == "dup" and not valid):
            lines.append(orjson.dumps(chat(cid)))
            valid.append(cid)
            continue
        lines.append({"json": b"{oops", "model": orjson.dumps(chat(cid, model="x")),
                      "dup": orjson.dumps(chat(random.Random(seed + i).choice(valid or ["c0"]))),
                      "role": orjson.dumps({**chat(cid), "body": {"model": "tiny", "messages": [{"role": "r"}]}}),
                      }[kind])
        invalid_lines.append(len(lines))
    if not valid:
        return
    res = split_requests(io.BytesIO(b"\n".join(lines) + b"\n"), sink.open, invalid_requests="skip",
                         open_rejected=Rows, models=["tiny"], limits=ShardLimits(max_requests=max_requests))
    sent = [r["custom_id"] for s in res.shards for r in rows_of(sink.data[s.index])]
    assert sent == valid
    rows = rows_of(Rows.kept)
    assert [r["line"] for r in rows] == invalid_lines
    ids = sent + [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)) == res.total == len(valid) + res.invalid
