"""VLLMBatchOperator's orchestration: validation, the engine subprocess, resume state, merge and manifest.

The engine is the real runner in a real subprocess with a fake ``LLM`` (airflow_provider_synth.testing.vllm);
the tests with the real vLLM engine are in tests/integration/test_vllm_engine.py.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import fsspec
import orjson
import pytest

from airflow_provider_synth.batch.errors import InvalidRequestsError
from airflow_provider_synth.exceptions import BatchFailedError, VLLMEngineError
from airflow_provider_synth.operators.vllm import VLLMBatchOperator, VLLMEngineConfig, gpu_pod_override
from airflow_provider_synth.testing.vllm import write_fake_python


def chat(cid: str, text: str, **params: object) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **params}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def read_lines(path: str) -> list[dict]:
    with fsspec.open(path, "rb") as fp:
        return [orjson.loads(x) for x in fp.read().splitlines() if x.strip()]


@pytest.fixture
def context() -> dict:
    ti = SimpleNamespace(try_number=1, dag_id="d", task_id="t", run_id="r", map_index=-1)
    return {"ti": ti}


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    return write_fake_python(tmp_path / "vllm-python")


@pytest.fixture
def requests_file(tmp_path: Path) -> Path:
    rows = [chat(f"r{i:03d}", f"question {i}") for i in range(60)]
    rows[7]["body"]["temperature"] = -1
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(rows))
    return path


def operator(input_path, output_path, python, **kwargs) -> VLLMBatchOperator:
    kwargs.setdefault("max_failed_ratio", 0.05)
    return VLLMBatchOperator(task_id="vllm", input_path=input_path, output_path=output_path, model="tiny",
                             python=python, chunk_size=8, **kwargs)


def test_runs_the_engine_and_writes_the_output_folder(requests_file, tmp_path, fake_python, context,
                                                       capsys) -> None:
    out = tmp_path / "out"
    engine = VLLMEngineConfig(max_model_len=64, extra={"hf_token": "hf_secret_value"})
    manifest = operator(str(requests_file), str(out), fake_python, engine=engine).execute(context)
    assert "hf_secret_value" not in (out / "manifest.json").read_text()
    assert manifest["backend"] == "vllm" and manifest["model"] == "tiny"
    assert manifest["engine"] == {"tensor_parallel_size": 1, "dtype": "auto", "enforce_eager": False,
                                  "max_model_len": 64}  # the hf_token never reaches XCom
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (60, 59, 1, 0)
    assert manifest["duplicates"] == 0 and manifest["usage"]["requests"] == 59
    assert manifest["usage"]["completion_tokens"] == 59 * 3 and manifest["usage"]["prompt_tokens"] == 59 * 2
    results = read_lines(manifest["results_path"])
    assert [r["custom_id"] for r in results] == [f"r{i:03d}" for i in range(60) if i != 7]
    assert results[0]["response"]["body"]["choices"][0]["message"]["content"] == "echo: question 0"
    [failure] = read_lines(manifest["failures_path"])
    assert failure["custom_id"] == "r007" and failure["status_code"] == 400 and not failure["retryable"]
    assert orjson.loads((out / "manifest.json").read_bytes())["succeeded"] == 59
    assert "vLLM progress: 60/60 requests (1 failed)" in capsys.readouterr().out


def test_over_max_failed_ratio_fails_after_writing_the_manifest(requests_file, tmp_path, fake_python,
                                                                 context) -> None:
    out = tmp_path / "out"
    with pytest.raises(BatchFailedError, match="1 of 60 requests failed"):
        operator(str(requests_file), str(out), fake_python, max_failed_ratio=0.0).execute(context)
    assert orjson.loads((out / "manifest.json").read_bytes())["failed"] == 1


def test_invalid_input_fails_before_the_engine_starts(tmp_path, context) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([chat("a", "hi"), {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                                             "body": {"model": "tiny"}}, chat("a", "again")]))
    op = operator(str(bad), str(tmp_path / "out"), "/nonexistent/python")
    with pytest.raises(InvalidRequestsError) as err:
        op.execute(context)
    assert "bad.jsonl:2 custom_id='b': body.messages is missing" in str(err.value)
    assert "duplicate custom_id" in str(err.value)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["_claims"]  # nothing but the task's claim


def test_unserved_endpoint_fails_before_the_engine_starts(tmp_path, fake_python, context) -> None:
    path = tmp_path / "resp.jsonl"
    path.write_bytes(jsonl([{"custom_id": "a", "method": "POST", "url": "/v1/responses",
                             "body": {"model": "tiny", "input": "hi"}}]))
    with pytest.raises(InvalidRequestsError, match="resp.jsonl:1 custom_id='a': unsupported url '/v1/responses': "
                       "this backend serves .*/v1/score, /v1/rerank"):
        operator(str(path), str(tmp_path / "out"), fake_python).execute(context)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["_claims"]  # nothing but the task's claim


def scoring(cid: str, url: str, **body: object) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "tiny", **body}}


def test_score_and_rerank_lines_run_through_the_operator(tmp_path, fake_python, context) -> None:
    """vLLM's own spellings (/rerank, /v1/rerank, /v2/rerank; /score, /v1/score), one engine call per chunk."""
    rerank = [scoring("r1", "/rerank", query="brown fox", documents=["a brown fox", "airflow", "a fox"]),
              scoring("r2", "/v1/rerank", query="fox", documents=["fox", "dog"], top_n=1),
              scoring("r3", "/v2/rerank", query="dog", documents=["a dog"])]
    src = tmp_path / "rerank.jsonl"
    src.write_bytes(jsonl(rerank))
    manifest = operator(str(src), str(tmp_path / "rr"), fake_python).execute(context)
    assert (manifest["total"], manifest["succeeded"], manifest["endpoint"]) == (3, 3, "/v1/rerank")
    results = {r["custom_id"]: r["response"]["body"] for r in read_lines(manifest["results_path"])}
    assert [x["index"] for x in results["r1"]["results"]] == [0, 2, 1]  # by relevance, as vLLM's server sorts
    assert [x["document"]["text"] for x in results["r2"]["results"]] == ["fox"]
    assert results["r3"]["results"][0]["relevance_score"] == 1.0
    assert manifest["usage"]["prompt_tokens"] > 0

    score = [scoring("s1", "/score", text_1="fox", text_2=["a fox", "a dog"]),
             scoring("s2", "/v1/score", queries=["a b", "c"], documents=["a", "d"])]
    src = tmp_path / "score.jsonl"
    src.write_bytes(jsonl(score))
    manifest = operator(str(src), str(tmp_path / "sc"), fake_python).execute(context)
    assert (manifest["total"], manifest["succeeded"], manifest["endpoint"]) == (2, 2, "/v1/score")
    results = {r["custom_id"]: r["response"]["body"] for r in read_lines(manifest["results_path"])}
    assert [d["score"] for d in results["s1"]["data"]] == [1.0, 0.0]
    assert [d["score"] for d in results["s2"]["data"]] == [0.5, 0.0]


def test_bad_score_lines_are_refused_or_set_aside(tmp_path, fake_python, context) -> None:
    rows = [scoring("ok", "/v1/score", text_1="fox", text_2=["a fox", "a dog"]),
            scoring("unpaired", "/v1/score", text_1=["a", "b"], text_2=["c", "d", "e"]),
            scoring("no-text-2", "/score", text_1="a"),
            scoring("rerank", "/v1/rerank", query="fox", documents=["fox"]),  # another endpoint in the file
            scoring("chat", "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}]),
            scoring("other-model", "/v1/score", text_1="a", text_2="b", model="gpt-4o"),
            scoring("ok-2", "/score", text_1="dog", text_2="a dog")]
    src = tmp_path / "score.jsonl"
    src.write_bytes(jsonl(rows))
    with pytest.raises(InvalidRequestsError) as info:
        operator(str(src), str(tmp_path / "refused"), fake_python).execute(context)
    assert [p.line for p in info.value.problems] == [2, 3, 4, 5, 6]
    text = str(info.value)
    assert "cannot pair 2 quer(ies) with 3 document(s)" in text and "needs text_1 and text_2" in text
    assert "differs from the batch's endpoint '/v1/score'" in text and "not served here" in text
    assert [p.name for p in (tmp_path / "refused").iterdir()] == ["_claims"]  # nothing but the task's claim

    manifest = operator(str(src), str(tmp_path / "out"), fake_python, invalid_requests="skip",
                        max_failed_ratio=1.0).execute(context)
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["invalid"]) == (7, 2, 5, 5)
    failures = {f["custom_id"]: f for f in read_lines(manifest["failures_path"])}
    assert sorted(failures) == ["chat", "no-text-2", "other-model", "rerank", "unpaired"]
    assert failures["other-model"]["status_code"] == 404 and failures["unpaired"]["line"] == 2
    assert sorted(r["custom_id"] for r in read_lines(manifest["results_path"])) == ["ok", "ok-2"]


def test_missing_interpreter_is_a_clear_error(requests_file, tmp_path, context) -> None:
    with pytest.raises(VLLMEngineError, match="does not exist or is not executable"):
        operator(str(requests_file), str(tmp_path / "out"), str(tmp_path / "no-python")).execute(context)


def test_interpreter_without_vllm_fails_before_any_request(requests_file, tmp_path, context) -> None:
    out = tmp_path / "out"
    with pytest.raises(VLLMEngineError, match="vllm_missing, exit code 3.*vLLM is not importable"):
        operator(str(requests_file), str(out), sys.executable).execute(context)
    assert not (out / "_vllm" / "engine-output.jsonl").exists()


def test_retry_resumes_from_the_saved_answers(requests_file, tmp_path, fake_python, context, monkeypatch,
                                              capsys) -> None:
    out = tmp_path / "out"
    with pytest.raises(VLLMEngineError, match="engine, exit code 5"):
        operator(str(requests_file), str(out), fake_python, env={"SYNTH_FAKE_VLLM_DIE_AFTER": "24"}).execute(context)
    saved = read_lines(str(out / "_vllm" / "engine-output.jsonl"))
    # the 24 answers given before the engine died, and r007's refusal (written when it was refused)
    assert sorted(r["custom_id"] for r in saved) == [f"r{i:03d}" for i in range(25)]
    capsys.readouterr()
    manifest = operator(str(requests_file), str(out), fake_python).execute(context)
    assert "'already_done': 25" in capsys.readouterr().out
    assert (manifest["succeeded"], manifest["failed"], manifest["duplicates"]) == (59, 1, 0)
    ids = [r["custom_id"] for r in read_lines(str(out / "_vllm" / "engine-output.jsonl"))]
    assert sorted(ids) == [f"r{i:03d}" for i in range(60)]


def test_the_timeout_stops_the_engine_and_a_retry_resumes(requests_file, tmp_path, fake_python, context) -> None:
    """The shared ``timeout`` bounds one try's engine (it did nothing on vLLM before: the engine ran on)."""
    from airflow_provider_synth.exceptions import BatchTimeoutError

    out = tmp_path / "out"
    slow = operator(str(requests_file), str(out), fake_python, timeout=4.0, env={"SYNTH_FAKE_VLLM_DELAY": "0.2"})
    started = time.monotonic()
    with pytest.raises(BatchTimeoutError, match="it was stopped, and the answers it gave are kept in"):
        slow.execute(context)
    assert time.monotonic() - started < 60  # 60 answers at 0.2 s a step would take longer than the timeout
    saved = {r["custom_id"] for r in read_lines(str(out / "_vllm" / "engine-output.jsonl"))}
    assert 0 < len(saved) < 60
    manifest = operator(str(requests_file), str(out), fake_python).execute(context)
    assert (manifest["succeeded"], manifest["failed"], manifest["duplicates"]) == (59, 1, 0)


def test_deferrable_is_refused_with_a_reason(requests_file, tmp_path, fake_python) -> None:
    with pytest.raises(ValueError, match="cannot defer: the engine runs in the task"):
        operator(str(requests_file), str(tmp_path / "out"), fake_python, deferrable=True)


def test_a_crash_after_the_engine_finished_keeps_its_answers(requests_file, tmp_path, fake_python, context,
                                                             monkeypatch, capsys) -> None:
    # vLLM's teardown can abort the process after every answer is on disk: that is not a failed run
    manifest = operator(str(requests_file), str(tmp_path / "out"), fake_python,
                        env={"SYNTH_FAKE_VLLM_ABORT_AT_EXIT": "1"}).execute(context)
    assert (manifest["succeeded"], manifest["failed"]) == (59, 1)
    assert "exited with code -6 after finishing its work" in capsys.readouterr().out


def test_a_crash_before_the_engine_finished_fails_the_task(requests_file, tmp_path, fake_python, context,
                                                           monkeypatch) -> None:
    env = {"SYNTH_FAKE_VLLM_ABORT_AT_EXIT": "1", "SYNTH_FAKE_VLLM_DIE_AFTER": "16"}
    with pytest.raises(VLLMEngineError, match="engine, exit code -6"):
        operator(str(requests_file), str(tmp_path / "out"), fake_python, env=env).execute(context)


def test_saved_answers_for_another_input_are_discarded(requests_file, tmp_path, fake_python, context) -> None:
    out = tmp_path / "out"
    operator(str(requests_file), str(out), fake_python).execute(context)
    requests_file.write_bytes(jsonl([chat(f"r{i:03d}", f"changed {i}") for i in range(5)]))
    manifest = operator(str(requests_file), str(out), fake_python).execute(context)
    assert manifest["total"] == 5 and manifest["unknown"] == 0
    first = read_lines(manifest["results_path"])[0]
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "echo: changed 0"


def test_object_storage_input_and_output(tmp_path, fake_python, context) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/synth-test/in.jsonl", jsonl([chat(f"m{i}", f"hello {i}") for i in range(20)]))
    manifest = operator("memory://synth-test/in.jsonl", "memory://synth-test/out", fake_python,
                        work_dir=str(tmp_path)).execute(context)
    assert manifest["succeeded"] == 20 and manifest["results_path"] == "memory://synth-test/out/results.jsonl"
    assert len(read_lines("memory://synth-test/out/_vllm/engine-output.jsonl")) == 20
    assert [r["custom_id"] for r in read_lines(manifest["results_path"])] == [f"m{i}" for i in range(20)]
    assert list(tmp_path.glob("synth-vllm-*")) == []  # the local scratch copy is cleaned up


def test_on_kill_stops_the_engine(requests_file, tmp_path, fake_python, context, monkeypatch) -> None:
    op = operator(str(requests_file), str(tmp_path / "out"), fake_python, env={"SYNTH_FAKE_VLLM_DELAY": "0.5"})
    errors: list[BaseException] = []

    def target() -> None:
        try:
            op.execute(context)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 30
    while op._proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc = op._proc
    op.on_kill()
    thread.join(30)
    assert not thread.is_alive() and proc is not None and proc.poll() is not None
    assert errors and isinstance(errors[0], VLLMEngineError)


def test_engine_config_kwargs() -> None:
    cfg = VLLMEngineConfig(dtype="float32", max_model_len=512, extra={"quantization": "awq", "seed": 3})
    assert cfg.llm_kwargs() == {"tensor_parallel_size": 1, "dtype": "float32", "max_model_len": 512,
                                "enforce_eager": False, "quantization": "awq", "seed": 3}


def test_parser_options_reach_the_runner_not_vllm_llm(requests_file, tmp_path, fake_python, context,
                                                      monkeypatch) -> None:
    from airflow_provider_synth.engine.vllm.config import RunnerConfig

    engine = VLLMEngineConfig(tool_call_parser="pythonic", enable_auto_tool_choice=True,
                              reasoning_parser="deepseek_r1")
    assert set(engine.llm_kwargs()) == {"tensor_parallel_size", "dtype", "enforce_eager"}
    written: list[dict] = []
    real_write = Path.write_bytes

    def spy(self: Path, data: bytes) -> int:
        if self.name == "runner.json":
            written.append(orjson.loads(data))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", spy)
    manifest = operator(str(requests_file), str(tmp_path / "out"), fake_python, engine=engine).execute(context)
    assert manifest["succeeded"] == 59
    (config,) = written
    assert (config["tool_call_parser"], config["enable_auto_tool_choice"], config["reasoning_parser"]) == (
        "pythonic", True, "deepseek_r1")
    runner_cfg = RunnerConfig(**config)  # the runner takes every key the operator writes
    assert runner_cfg.tool_call_parser == "pythonic"


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        VLLMBatchOperator(task_id="x", input_path="i", output_path="o", model="m", chunk_size=0)
    with pytest.raises(ValueError, match="max_failed_ratio"):
        VLLMBatchOperator(task_id="x", input_path="i", output_path="o", model="m", max_failed_ratio=2)
    with pytest.raises(ValueError, match="retry_failed_requests"):
        VLLMBatchOperator(task_id="x", input_path="i", output_path="o", model="m", retry_failed_requests=-1)


def test_gpu_pod_override_asks_for_gpus() -> None:
    pytest.importorskip("kubernetes")
    pod = gpu_pod_override(2, memory="32Gi", node_selector={"pool": "gpu"})["pod_override"]
    container = pod.spec.containers[0]
    assert container.name == "base" and container.resources.limits == {"nvidia.com/gpu": "2", "memory": "32Gi"}
    assert pod.spec.node_selector == {"pool": "gpu"}


def test_an_error_while_waiting_stops_the_engine(requests_file, tmp_path, fake_python, context,
                                                 monkeypatch) -> None:
    """execution_timeout raises inside execute(): the engine must not outlive the task."""
    from airflow_provider_synth.runs import vllm as vllm_run

    op = operator(str(requests_file), str(tmp_path / "out"), fake_python, env={"SYNTH_FAKE_VLLM_DELAY": "0.5"})
    started: list = []

    def timeout_on_progress(self, raw: bytes) -> None:
        started.append(op._proc)
        if b'"progress"' in raw:
            raise TimeoutError("execution_timeout")

    monkeypatch.setattr(vllm_run._Relay, "line", timeout_on_progress)
    with pytest.raises(TimeoutError):
        op.execute(context)
    assert started[0].poll() is not None and op._proc is None


def test_merge_output_folders_refuses_manifests_that_do_not_add_up(tmp_path) -> None:
    from airflow_provider_synth.batch.errors import AccountingError
    from airflow_provider_synth.batch.manifest import build_manifest, write_manifest
    from airflow_provider_synth.operators.vllm import merge_output_folders

    shard = tmp_path / "shard-0"
    shard.mkdir()
    (shard / "results.jsonl").write_bytes(b"")
    (shard / "failures.jsonl").write_bytes(b"")
    write_manifest(shard, build_manifest(backend="vllm", output_dir=shard,
                                         accounting={"total": 3, "succeeded": 1, "failed": 0, "missing": 0}))
    with pytest.raises(AccountingError, match="do not add up"):
        merge_output_folders([str(shard)], str(tmp_path / "merged"))


def test_merge_output_folders_adds_up_every_count_of_the_shards(tmp_path, fake_python, context) -> None:
    """Two shards run by the operator (each with an invalid line set aside and an engine-refused request):
    the combined manifest sums counts, error codes, invalid lines and usage, and concatenates the files."""
    from airflow_provider_synth.operators.vllm import merge_output_folders

    folders = []
    for shard in range(2):
        rows = [chat(f"s{shard}-{i}", f"question {i}") for i in range(5)]
        rows[1]["body"]["temperature"] = -1  # refused by the engine: an invalid_request error line
        rows[3]["body"]["messages"] = []  # invalid: set aside before the engine starts
        src = tmp_path / f"in-{shard}.jsonl"
        src.write_bytes(jsonl(rows))
        out = tmp_path / f"shard-{shard}"
        operator(str(src), str(out), fake_python, invalid_requests="skip", max_failed_ratio=1.0).execute(context)
        folders.append(str(out))
    shards = [orjson.loads((Path(f) / "manifest.json").read_bytes()) for f in folders]
    merged = merge_output_folders(folders, str(tmp_path / "merged"), dag_id="d")
    assert (merged["total"], merged["succeeded"], merged["failed"], merged["invalid"]) == (10, 6, 4, 2)
    assert merged["error_codes"] == {code: sum(s["error_codes"].get(code, 0) for s in shards)
                                     for code in shards[0]["error_codes"]}
    assert sum(merged["error_codes"].values()) == 4
    assert merged["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in shards)
    assert (merged["shards"], merged["dag_id"], merged["cost_usd"]) == (2, "d", None)
    assert [r["custom_id"] for r in read_lines(merged["results_path"])] == [
        "s0-0", "s0-2", "s0-4", "s1-0", "s1-2", "s1-4"]
    assert sorted(f["custom_id"] for f in read_lines(merged["failures_path"])) == ["s0-1", "s0-3", "s1-1", "s1-3"]


def test_retry_reruns_only_failures_a_retry_can_fix(requests_file, tmp_path, fake_python, context) -> None:
    from airflow_provider_synth.batch.results import error_line

    out = tmp_path / "out"
    operator(str(requests_file), str(out), fake_python).execute(context)
    engine_output = out / "_vllm" / "engine-output.jsonl"
    lines = engine_output.read_bytes().splitlines()
    lines[1] = error_line("r001", "server_error", "the engine aborted the request", status_code=500)
    engine_output.write_bytes(b"\n".join(lines) + b"\n")
    manifest = operator(str(requests_file), str(out), fake_python).execute(context)
    assert (manifest["succeeded"], manifest["failed"], manifest["duplicates"]) == (59, 1, 0)
    answers = [r for r in read_lines(str(engine_output)) if r["custom_id"] == "r001"]
    assert [a["response"]["status_code"] for a in answers] == [500, 200]  # appended, never rewritten
    assert len(read_lines(str(engine_output))) == 61  # r007's 400 was final: not run again


def test_output_checks_send_cut_off_answers_to_failures(tmp_path, fake_python, context) -> None:
    from airflow_provider_synth.batch.checks import OutputChecks

    rows = [chat(f"r{i:03d}", "a b c d e f" if i % 5 == 0 else f"question {i}") for i in range(20)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(rows))
    checks = OutputChecks(finish_reasons={"length"})
    manifest = operator(str(path), str(tmp_path / "out"), fake_python, checks=checks, retry_failed_requests=0,
                        max_failed_ratio=0.25).execute(context)
    assert (manifest["succeeded"], manifest["failed"]) == (16, 4)
    assert manifest["checks"]["truncated"] == 4 and manifest["checks"]["usage"]["requests"] == 4
    assert manifest["usage"]["requests"] == 16 and manifest["error_codes"] == {"truncated": 4}
    fails = read_lines(manifest["failures_path"])
    assert [f["custom_id"] for f in fails] == ["r000", "r005", "r010", "r015"]
    assert all(f["text"] == "echo: a b c" and f["error"]["code"] == "truncated" for f in fails)
    assert all(r["response"]["body"]["choices"][0]["finish_reason"] == "stop"
               for r in read_lines(manifest["results_path"]))
    with pytest.raises(ValueError, match="direct_tail"):
        operator(str(path), str(tmp_path / "o2"), fake_python, checks=OutputChecks(direct_tail=3))


def test_the_lines_model_is_honoured(tmp_path, fake_python, context) -> None:
    """A model the engine does not serve: refused under "fail", a 404 failure row under "skip";
    served_model_names maps other names (a hub id) onto the engine."""
    rows = [chat("a", "one"), chat("b", "two"), chat("c", "three"), chat("d", "four")]
    rows[1]["body"]["model"] = "org/tiny-hub-id"
    rows[2]["body"]["model"] = "gpt-4o"
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(rows))
    with pytest.raises(InvalidRequestsError, match="model 'gpt-4o' is not served here") as info:
        operator(str(src), str(tmp_path / "refused"), fake_python).execute(context)
    assert [p.line for p in info.value.problems] == [2, 3]

    engine = VLLMEngineConfig(served_model_names=["tiny", "org/tiny-hub-id"])
    assert "served_model_names" not in engine.llm_kwargs()
    out = tmp_path / "out"
    manifest = operator(str(src), str(out), fake_python, engine=engine, invalid_requests="skip",
                        max_failed_ratio=0.25).execute(context)
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["invalid"]) == (4, 3, 1, 1)
    [failure] = read_lines(manifest["failures_path"])
    assert (failure["custom_id"], failure["status_code"], failure["error"]["code"], failure["line"]) == (
        "c", 404, "model_not_found", 3)
    assert [r["custom_id"] for r in read_lines(manifest["results_path"])] == ["a", "b", "d"]
    assert sorted(r["custom_id"] for r in read_lines(str(out / "_vllm" / "engine-output.jsonl"))) == ["a", "b", "d"]


def test_served_names() -> None:
    assert VLLMEngineConfig().served_names("/models/qwen") == ["/models/qwen"]
    assert VLLMEngineConfig(extra={"served_model_name": "qwen"}).served_names("/m") == ["qwen"]
    assert VLLMEngineConfig(served_model_names=["a", "b"], extra={"served_model_name": "c"}).served_names("/m") == [
        "a", "b"]


def test_merge_output_folders_reports_no_cost_when_a_shard_has_no_price(tmp_path) -> None:
    """One cost rule (``batch.usage.total_cost``): a shard without a price makes the total unknown. Old main
    summed only the shards that had one and reported $0.50 for a run whose other half cost an unknown amount."""
    from airflow_provider_synth.batch.manifest import build_manifest, write_manifest
    from airflow_provider_synth.operators.vllm import merge_output_folders

    folders = []
    for i, cost in enumerate((0.5, None)):
        shard = tmp_path / f"shard-{i}"
        shard.mkdir()
        (shard / "results.jsonl").write_bytes(b"")
        (shard / "failures.jsonl").write_bytes(b"")
        write_manifest(shard, build_manifest(backend="openai", output_dir=shard, accounting={
            "total": 0, "succeeded": 0, "failed": 0, "missing": 0, "cost_usd": cost}))
        folders.append(str(shard))
    assert merge_output_folders(folders, str(tmp_path / "merged"))["cost_usd"] is None
    assert merge_output_folders(folders[:1] * 2, str(tmp_path / "merged2"))["cost_usd"] == 1.0
