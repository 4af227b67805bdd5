from __future__ import annotations

import io

import orjson
import pytest

from airflow_provider_synth.batch import InvalidRequestsError, validate_requests


def line(cid: str = "a", url: str = "/v1/chat/completions", **body: object) -> dict:
    b = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    b.update(body)
    return {"custom_id": cid, "method": "POST", "url": url, "body": b}


def jsonl(*rows: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows)


def test_valid_file_summary(tmp_path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(jsonl(line("a"), line("b")))
    s = validate_requests(str(p))
    assert (s.total, s.endpoint, s.model) == (2, "/v1/chat/completions", "gpt-4o-mini")


def test_every_problem_reported_with_file_line_and_id(tmp_path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(jsonl(
        line("a"),
        b'{"custom_id": "b", "method": "POST", "url": ',           # 2 malformed
        line("a"),                                                 # 3 duplicate
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},  # 4 no custom_id
        line("c", url="/v1/images/generations"),                   # 5 unsupported url
        line("d", stream=True),                                    # 6 stream
        {"custom_id": "e", "method": "GET", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini",
                                                                                  "messages": []}},  # 7
        line("f", model="gpt-4o"),                                 # 8 second model
        line("g", url="/v1/embeddings"),                           # 9 endpoint mix
    ))
    with pytest.raises(InvalidRequestsError) as info:
        validate_requests(str(p))
    by_line = {(pr.line, pr.custom_id): pr.reason for pr in info.value.problems}
    msg = str(info.value)
    assert f"{p}:2" in msg and "malformed JSON" in by_line[(2, "b")]
    assert "duplicate custom_id (first used on line 1)" == by_line[(3, "a")]
    assert "custom_id" in by_line[(4, None)]
    assert "unsupported url '/v1/images/generations'" in by_line[(5, "c")]
    assert "stream" in by_line[(6, "d")]
    reasons7 = [pr.reason for pr in info.value.problems if pr.line == 7]
    assert any("method must be 'POST'" in r for r in reasons7) and any("messages" in r for r in reasons7)
    assert "one batch file serves one model" in by_line[(8, "f")]
    assert any("one batch serves one endpoint" in pr.reason for pr in info.value.problems if pr.line == 9)
    assert "nothing was submitted" in msg


def test_empty_file_and_oversized_line(tmp_path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"\n\n")
    with pytest.raises(InvalidRequestsError, match="empty"):
        validate_requests(str(p))
    big = line("x", messages=[{"role": "user", "content": "y" * 5000}])
    with pytest.raises(InvalidRequestsError, match="over the per-request limit"):
        validate_requests([big], max_line_bytes=1000)


@pytest.mark.parametrize("body,ok", [
    ({"model": "e", "input": "text"}, True),
    ({"model": "e", "input": ["a", "b"]}, True),
    ({"model": "e", "input": [1, 2, 3]}, True),
    ({"model": "e", "input": [[1, 2], [3]]}, True),
    ({"model": "e", "input": []}, False),
    ({"model": "e", "input": [{"a": 1}]}, False),
    ({"model": "e"}, False),
])
def test_embedding_bodies(body: dict, ok: bool) -> None:
    req = {"custom_id": "1", "method": "POST", "url": "/v1/embeddings", "body": body}
    if ok:
        assert validate_requests([req]).total == 1
    else:
        with pytest.raises(InvalidRequestsError, match="input"):
            validate_requests([req])


def test_file_object_and_unknown_role() -> None:
    fp = io.BytesIO(jsonl(line("a", messages=[{"role": "wizard", "content": "x"}])))
    with pytest.raises(InvalidRequestsError, match="unknown message role"):
        validate_requests(fp)


def test_duplicates_in_one_shot_iterator_are_still_reported() -> None:
    with pytest.raises(InvalidRequestsError, match="duplicate"):
        validate_requests(iter([line("a"), line("a")]))
