"""Output checks inside the vLLM engine: unusable answers asked again at once, alone, with their retry body.

Through the real operator and the real runner subprocess, with the fake engine
(airflow_provider_synth.testing.vllm): an answer cut to ``max_tokens`` words stops with ``"length"``, and a prompt
``JSON <a> <b>`` answers ``<a>`` the first time the engine is asked it, ``<b>`` after that.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from pydantic import BaseModel

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.results import error_line, success_line
from airflow_provider_synth.engine.vllm.config import RunnerConfig
from airflow_provider_synth.engine.vllm.resume import Rechecks, iter_requests, recover_output
from airflow_provider_synth.exceptions import VLLMEngineError
from airflow_provider_synth.operators.vllm import VLLMBatchOperator
from airflow_provider_synth.testing.vllm import write_fake_python

FIXABLE = "a b c d e f"                     # "echo: a b c d e f": 7 words, cut at 4, whole at 8
NEVER = " ".join(["word"] * 12)             # 13 words: cut at 4 and at 8
TRUNCATED = OutputChecks(finish_reasons={"length"}, retry_body={"truncated": {"max_tokens": 8}})


class Item(BaseModel):
    n: int


def chat(cid: str, text: str, **params: object) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **params}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def read_lines(path: str | Path) -> list[dict]:
    return [orjson.loads(x) for x in Path(path).read_bytes().splitlines() if x.strip()]


def by_id(path: Path) -> dict[str, list[dict]]:
    """The engine's output lines per custom_id, in the order they were written."""
    lines: dict[str, list[dict]] = defaultdict(list)
    for line in read_lines(path):
        lines[line["custom_id"]].append(line)
    return lines


def finish(line: dict) -> str:
    return line["response"]["body"]["choices"][0]["finish_reason"]


def content(line: dict) -> str:
    return line["response"]["body"]["choices"][0]["message"]["content"]


@pytest.fixture
def context() -> dict:
    return {"ti": SimpleNamespace(try_number=1, dag_id="d", task_id="t", run_id="r", map_index=-1)}


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    return write_fake_python(tmp_path / "vllm-python")


def operator(src: Path, out: Path, python: str, **kwargs) -> VLLMBatchOperator:
    return VLLMBatchOperator(task_id="vllm", input_path=str(src), output_path=str(out), model="tiny", python=python,
                             chunk_size=8, **kwargs)


def assert_each_id_once(manifest: dict, ids: list[str]) -> None:
    results = [r["custom_id"] for r in read_lines(manifest["results_path"])]
    failures = [f["custom_id"] for f in read_lines(manifest["failures_path"])]
    assert sorted(results + failures) == sorted(ids)
    assert manifest["succeeded"] + manifest["failed"] + manifest["missing"] == manifest["total"] == len(ids)
    assert manifest["duplicates"] == 0 and manifest["unknown"] == 0


def test_truncated_answers_are_asked_again_with_the_retry_body_and_land_in_results(tmp_path, fake_python,
                                                                                   context, capsys) -> None:
    rows = [chat(f"r{i:03d}", FIXABLE if i % 3 == 0 else f"question {i}") for i in range(30)]
    out = tmp_path / "out"
    manifest = operator(write(tmp_path / "in.jsonl", rows), out, fake_python, checks=TRUNCATED).execute(context)
    ids = [r["custom_id"] for r in rows]
    assert_each_id_once(manifest, ids)
    assert (manifest["succeeded"], manifest["failed"], manifest["error_codes"]) == (30, 0, {})
    cut = {f"r{i:03d}" for i in range(0, 30, 3)}
    engine = by_id(out / "_vllm" / "engine-output.jsonl")
    for cid, lines in engine.items():
        if cid in cut:  # the cut answer stays in the engine's output (it was billed), then the retry's answer
            assert [finish(x) for x in lines] == ["length", "stop"]
            assert [x["response"]["body"]["usage"]["completion_tokens"] for x in lines] == [4, 7]
        else:
            assert [finish(x) for x in lines] == ["stop"]
    results = {r["custom_id"]: r for r in read_lines(manifest["results_path"])}
    assert all(content(results[cid]) == "echo: a b c d e f" and finish(results[cid]) == "stop" for cid in cut)
    checks = manifest["checks"]
    assert (checks["truncated"], checks["unusable"], checks["retried"], checks["rounds"]) == (10, 10, 10, 1)
    assert (checks["usage"]["requests"], checks["usage"]["completion_tokens"]) == (10, 40)
    assert manifest["usage"]["requests"] == 30 and manifest["usage"]["completion_tokens"] == 10 * 7 + 20 * 3
    assert "'retried': 10" in capsys.readouterr().out  # the runner's done event, in the task log


def test_an_answer_off_the_schema_after_every_round_ends_in_failures_with_its_text(tmp_path, fake_python,
                                                                                   context) -> None:
    rows = [chat("good", 'JSON {"n":2}'), chat("bad", 'JSON {"n":"x"}'),
            *[chat(f"flaky{i}", f'JSON {{"n":"x{i}"}} {{"n":{i}}}') for i in range(3)]]
    out = tmp_path / "out"
    # the pydantic model reaches the engine's interpreter (no DAG code there) as its JSON schema
    manifest = operator(write(tmp_path / "in.jsonl", rows), out, fake_python, checks=OutputChecks(schema=Item),
                        max_failed_ratio=0.5).execute(context)
    assert_each_id_once(manifest, [r["custom_id"] for r in rows])
    assert (manifest["succeeded"], manifest["failed"], manifest["error_codes"]) == (4, 1, {"schema_invalid": 1})
    engine = by_id(out / "_vllm" / "engine-output.jsonl")
    assert {cid: len(lines) for cid, lines in engine.items()} == {"good": 1, "bad": 3, "flaky0": 2, "flaky1": 2,
                                                                   "flaky2": 2}
    [failure] = read_lines(manifest["failures_path"])
    assert (failure["custom_id"], failure["error"]["code"], failure["text"], failure["attempts"]) == (
        "bad", "schema_invalid", '{"n":"x"}', 3)
    parsed = {r["custom_id"]: r["parsed"] for r in read_lines(manifest["results_path"])}
    assert parsed == {"good": {"n": 2}, "flaky0": {"n": 0}, "flaky1": {"n": 1}, "flaky2": {"n": 2}}
    checks = manifest["checks"]
    # kinds over every round: three flaky first answers, and the bad one's three
    assert (checks["schema_invalid"], checks["unusable"], checks["retried"], checks["rounds"]) == (6, 6, 5, 2)
    assert checks["usage"]["requests"] == 6 and manifest["usage"]["requests"] == 4


@pytest.mark.parametrize("rounds, checks", [(0, TRUNCATED), (2, OutputChecks(finish_reasons={"length"},
                                                                             retry=False))])
def test_without_rounds_unusable_answers_are_only_reported(rounds, checks, tmp_path, fake_python, context) -> None:
    rows = [chat(f"r{i:03d}", FIXABLE if i % 5 == 0 else f"question {i}") for i in range(20)]
    out = tmp_path / "out"
    manifest = operator(write(tmp_path / "in.jsonl", rows), out, fake_python, checks=checks,
                        retry_failed_requests=rounds, max_failed_ratio=0.25).execute(context)
    assert_each_id_once(manifest, [r["custom_id"] for r in rows])
    assert len(read_lines(out / "_vllm" / "engine-output.jsonl")) == 20  # nothing asked twice
    assert (manifest["succeeded"], manifest["failed"], manifest["error_codes"]) == (16, 4, {"truncated": 4})
    assert all(f["text"] == "echo: a b c" for f in read_lines(manifest["failures_path"]))
    checks_found = manifest["checks"]
    assert (checks_found["truncated"], checks_found["retried"], checks_found["rounds"]) == (4, 0, 0)


def test_a_killed_run_resumes_without_asking_answered_ids_and_still_retries_unusable_ones(tmp_path, fake_python,
                                                                                         context, capsys) -> None:
    rows = [chat(f"r{i:03d}", NEVER if i % 8 == 1 else FIXABLE if i % 4 == 0 else f"question {i}")
            for i in range(40)]
    src, out = write(tmp_path / "in.jsonl", rows), tmp_path / "out"
    engine_output = out / "_vllm" / "engine-output.jsonl"
    with pytest.raises(VLLMEngineError, match="engine, exit code 5"):
        operator(src, out, fake_python, checks=TRUNCATED, retry_failed_requests=1,
                 env={"SYNTH_FAKE_VLLM_DIE_AFTER": "28"}).execute(context)
    saved = by_id(engine_output)
    finished = {cid for cid, lines in saved.items() if finish(lines[-1]) == "stop"}
    to_retry = {cid for cid, lines in saved.items() if [finish(x) for x in lines] == ["length"]}
    spent = {cid for cid, lines in saved.items() if [finish(x) for x in lines] == ["length", "length"]}
    assert finished and to_retry and spent  # the kill left every case behind
    assert finished | to_retry | spent == set(saved)

    capsys.readouterr()
    manifest = operator(src, out, fake_python, checks=TRUNCATED, retry_failed_requests=1,
                        max_failed_ratio=0.2).execute(context)
    log = capsys.readouterr().out
    assert f"'already_done': {len(finished | spent)}" in log and f"'unusable_to_retry': {len(to_retry)}" in log
    after = by_id(engine_output)
    for cid in finished | spent:  # never asked again
        assert after[cid] == saved[cid]
    never = sorted(f"r{i:03d}" for i in range(1, 40, 8))
    for cid in to_retry:  # asked once more, with the retry body (max_tokens 8), never from scratch
        assert after[cid][:1] == saved[cid] and len(after[cid]) == 2
        retried = after[cid][1]
        if cid in never:
            assert retried["response"]["body"]["usage"]["completion_tokens"] == 8 and finish(retried) == "length"
        else:
            assert content(retried) == "echo: a b c d e f" and finish(retried) == "stop"
    assert_each_id_once(manifest, [r["custom_id"] for r in rows])
    assert [f["custom_id"] for f in read_lines(manifest["failures_path"])] == never
    assert all(f["attempts"] == 2 and f["error"]["code"] == "truncated" for f in read_lines(manifest["failures_path"]))
    checks = manifest["checks"]
    fixable = 10  # r000, r004, ... r036
    assert (checks["truncated"], checks["retried"], checks["rounds"]) == (fixable + 2 * len(never),
                                                                          fixable + len(never), 1)


def test_recover_output_counts_rounds_from_the_saved_lines(tmp_path) -> None:
    def answer(cid: str, reason: str) -> bytes:
        body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                             "finish_reason": reason}], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                                  "total_tokens": 2}}
        return success_line(cid, body)

    out = tmp_path / "out.jsonl"
    out.write_bytes(b"\n".join([
        answer("a", "length"),                                  # one unusable answer, a round left: again
        answer("b", "length"), answer("b", "length"),           # its round spent: final
        answer("c", "stop"),                                    # usable: final
        answer("d", "length"), error_line("d", "server_error", "aborted", status_code=500),  # retry lost: again
        answer("e", "length"), error_line("e", "invalid_request", "refused", status_code=400),  # final
    ]) + b"\n")
    rows = [chat(cid, "hi", temperature=0.5) for cid in "abcdef"]
    cfg = RunnerConfig(input=str(write(tmp_path / "in.jsonl", rows)), output=str(out), model="tiny",
                       checks=TRUNCATED.to_spec(), retry_failed_requests=1)
    rechecks = Rechecks.of(cfg)
    assert rechecks is not None
    done = recover_output(cfg.output, rechecks)
    assert done == {"b", "c", "e"}
    reqs = {r.custom_id: r for r in iter_requests(cfg.input, done, rechecks)}
    assert sorted(reqs) == ["a", "d", "f"]
    assert reqs["a"].body["max_tokens"] == reqs["d"].body["max_tokens"] == 8  # the retry body for "truncated"
    assert reqs["a"].original["max_tokens"] == 4 and reqs["a"].body["temperature"] == 0.5
    assert reqs["f"].body["max_tokens"] == 4 and reqs["f"].original is None  # never answered: as the input has it
    # without checks (or without rounds) every 200 is final, as before
    assert recover_output(cfg.output) == {"a", "b", "c", "d", "e"}
    assert Rechecks.of(RunnerConfig(input="", output="", model="", checks=TRUNCATED.to_spec())) is None
