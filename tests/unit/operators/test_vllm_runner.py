"""The vLLM runner's own logic (resume, chunking, error isolation, request mapping) with a fake engine."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from airflow_provider_synth.batch.results import ParsedOutput, parse_output_line
from airflow_provider_synth.engine.vllm.codecs import sampling_kwargs, structured_outputs_kwargs
from airflow_provider_synth.engine.vllm.config import (
    EVENT_KEY,
    EXIT_BAD_CONFIG,
    EXIT_ENGINE,
    EXIT_NO_VLLM,
    Request,
    RunnerConfig,
)
from airflow_provider_synth.engine.vllm.loop import OutputWriter, Processor
from airflow_provider_synth.engine.vllm.resume import recover_output
from airflow_provider_synth.engine.vllm.runner import run, shutdown_engine
from airflow_provider_synth.testing.vllm import FakeLLM, FakePooling, fake_processor


def chat(cid: str, text: str, **params: object) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], **params}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_requests(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def output_ids(path: Path) -> list[str]:
    return [orjson.loads(line)["custom_id"] for line in path.read_bytes().splitlines()]


@pytest.fixture
def cfg(tmp_path: Path) -> RunnerConfig:
    rows = [chat(f"r{i}", f"item {i} says hello", max_tokens=3) for i in range(25)]
    return RunnerConfig(input=str(write_requests(tmp_path / "in.jsonl", rows)), output=str(tmp_path / "out.jsonl"),
                        model="tiny", chunk_size=4)


def events(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"synth_vllm"')]


class TestRecoverOutput:
    def test_missing_file_means_nothing_done(self, tmp_path: Path) -> None:
        assert recover_output(str(tmp_path / "none.jsonl")) == set()

    def test_torn_tail_is_cut_and_complete_lines_kept(self, tmp_path: Path) -> None:
        out = tmp_path / "out.jsonl"
        good = (b'{"custom_id":"a","response":{"status_code":200,"body":{}},"error":null}\n'
                b'{"custom_id":"b","response":{"status_code":400,"body":{"error":{"code":"x"}}},"error":null}\n')
        out.write_bytes(good + b'{"custom_id":"c","respo')
        assert recover_output(str(out)) == {"a", "b"}
        assert out.read_bytes() == good

    def test_failures_a_retry_can_fix_are_run_again(self, tmp_path: Path) -> None:
        from airflow_provider_synth.batch.results import error_line, success_line

        out = tmp_path / "out.jsonl"
        out.write_bytes(b"\n".join([success_line("ok", {"choices": []}),
                                    error_line("bad", "invalid_request", "no", status_code=400),
                                    error_line("aborted", "server_error", "engine aborted", status_code=500)])
                        + b"\n")
        assert recover_output(str(out)) == {"ok", "bad"}

    def test_unparseable_complete_line_is_cut_with_what_follows(self, tmp_path: Path) -> None:
        out = tmp_path / "out.jsonl"
        a = b'{"custom_id":"a","response":{"status_code":200,"body":{}},"error":null}\n'
        out.write_bytes(a + b'{not json}\n{"custom_id":"b"}\n')
        assert recover_output(str(out)) == {"a"}
        assert out.read_bytes() == a


def answer_all(processor: Processor, reqs: list[Request]) -> list[ParsedOutput]:
    """Feed ``reqs`` to the processor and step the engine until every one is answered."""
    lines = [line for req in reqs if (line := processor.submit(req)) is not None]
    while processor.in_flight:
        lines.extend(processor.step())
    outs = [parse_output_line(line.rstrip(b"\n")) for line in lines]
    assert sorted(o.custom_id for o in outs) == sorted(r.custom_id for r in reqs)
    return outs


class TestRun:
    def test_the_engine_is_kept_full_and_answers_are_appended_as_they_finish(self, tmp_path: Path,
                                                                            capsys) -> None:
        # answers of different lengths: short ones overtake long ones, as in vLLM's continuous batching
        rows = [chat(f"r{i}", " ".join(["word"] * (1 + (i * 7) % 5))) for i in range(25)]
        cfg = RunnerConfig(input=str(write_requests(tmp_path / "in.jsonl", rows)),
                           output=str(tmp_path / "out.jsonl"), model="tiny", chunk_size=4, flush_interval=60)
        llm = FakeLLM()
        assert run(cfg, lambda c, url: fake_processor(c, url, llm)) == 0
        ids = output_ids(Path(cfg.output))
        assert sorted(ids) == sorted(f"r{i}" for i in range(25)) and len(ids) == 25
        assert ids != [f"r{i}" for i in range(25)]  # written in the order they finished
        # no chunk boundary: before every step the engine holds 4 requests, or all that are left
        steps = llm.llm_engine.in_flight_at_step
        assert all(in_flight == min(4, 25 - answered) for in_flight, answered in steps), steps
        assert len(steps) < 25 * 6 / 4 + 6  # about (answer length / 4 in flight) steps, not per-chunk drains
        evs = events(capsys)
        assert evs[0] == {"synth_vllm": "start", "total": 25, "already_done": 0, "pending": 25}
        progress = [e for e in evs if e["synth_vllm"] == "progress"]
        assert progress and all(e["done"] % 4 == 0 for e in progress[:-1])  # a write per 4 answers
        assert evs[-1]["synth_vllm"] == "done" and evs[-1]["done"] == 25 and evs[-1]["tokens_per_s"] > 0

    def test_resume_after_a_torn_write_answers_each_id_exactly_once(self, cfg: RunnerConfig, capsys) -> None:
        run(cfg, lambda c, url: fake_processor(c, url, FakeLLM()))
        out = Path(cfg.output)
        lines = out.read_bytes().splitlines(keepends=True)
        out.write_bytes(b"".join(lines[:10]) + lines[10][:17])  # killed while writing line 11
        capsys.readouterr()
        llm = FakeLLM()
        assert run(cfg, lambda c, url: fake_processor(c, url, llm)) == 0
        ids = output_ids(out)
        assert sorted(ids) == sorted(f"r{i}" for i in range(25)) and len(ids) == 25
        assert llm.llm_engine.answered == 15  # only what was missing went to the engine
        start = events(capsys)[1]
        assert start["synth_vllm"] == "start" and start["already_done"] == 10

    def test_nothing_pending_never_loads_the_engine(self, cfg: RunnerConfig) -> None:
        run(cfg, lambda c, url: fake_processor(c, url, FakeLLM()))

        def must_not_load(c, url):
            raise AssertionError("the engine was loaded with nothing to do")

        assert run(cfg, must_not_load) == 0

    def test_dead_engine_stops_the_run_and_keeps_the_answers_it_gave(self, tmp_path: Path, capsys) -> None:
        rows = [chat(f"r{i}", "DIE" if i == 9 else f"hello {i}") for i in range(12)]
        cfg = RunnerConfig(input=str(write_requests(tmp_path / "in.jsonl", rows)),
                           output=str(tmp_path / "out.jsonl"), model="tiny", chunk_size=4, flush_interval=60)
        assert run(cfg, lambda c, url: fake_processor(c, url, FakeLLM())) == EXIT_ENGINE
        assert output_ids(Path(cfg.output)) == [f"r{i}" for i in range(8)]
        assert events(capsys)[-1]["kind"] == "engine"

    def test_answers_wait_at_most_flush_interval(self, tmp_path: Path) -> None:
        clock = [0.0]
        path = tmp_path / "out.jsonl"
        with path.open("ab") as fp:
            writer = OutputWriter(fp, max_lines=3, interval=1.0, clock=lambda: clock[0])
            writer.add([b"a\n"])
            clock[0] = 0.9
            assert not writer.due()
            writer.add([b"b\n"])
            clock[0] = 1.0  # the first answer has waited its second
            assert writer.due() and writer.flush() and path.read_bytes() == b"a\nb\n"
            writer.add([b"c\n", b"d\n", b"e\n"])  # three waiting: due whatever the clock
            assert writer.due() and writer.flush() and writer.flushes == 2
            assert not writer.flush()  # nothing waits: no write, no sync
        assert path.read_bytes() == b"a\nb\nc\nd\ne\n"

    def test_a_line_for_a_model_the_engine_does_not_serve_gets_a_404(self, tmp_path: Path) -> None:
        rows = [chat("served", "hi"), chat("alias", "hi", model="org/tiny"), chat("other", "hi", model="gpt-4o"),
                chat("unnamed", "hi", model=None)]
        cfg = RunnerConfig(input=str(write_requests(tmp_path / "in.jsonl", rows)),
                           output=str(tmp_path / "out.jsonl"), model="/models/tiny",
                           served_model_names=["tiny", "org/tiny"])
        assert run(cfg, lambda c, url: fake_processor(c, url, FakeLLM())) == 0
        outs = {o.custom_id: o for o in map(parse_output_line, Path(cfg.output).read_bytes().splitlines())}
        assert [cid for cid, o in outs.items() if o.ok] == ["served", "alias", "unnamed"]
        other = outs["other"]
        assert (other.status_code, other.error_code, other.retryable) == (404, "model_not_found", False)
        assert "`gpt-4o` does not exist" in other.error_message and "org/tiny, tiny" in other.error_message
        alias = orjson.loads(outs["alias"].raw)["response"]["body"]
        assert alias["model"] == "tiny"  # the first served name, as vLLM's server writes it

    def test_served_names_default_to_the_model(self) -> None:
        assert RunnerConfig(input="i", output="o", model="/m").served_names() == ["/m"]
        assert RunnerConfig(input="i", output="o", model="/m", served_model_name="m").served_names() == ["m"]
        engine_named = RunnerConfig(input="i", output="o", model="/m", llm_kwargs={"served_model_name": ["a", "b"]})
        assert engine_named.served_names() == ["a", "b"]


class TestProcessor:
    def processor(self, llm: FakeLLM | None = None, **sampling: object) -> Processor:
        cfg = RunnerConfig(input="-", output="-", model="/models/tiny", sampling=dict(sampling),
                           served_model_names=["tiny"])
        return fake_processor(cfg, "/v1/chat/completions", llm or FakeLLM())

    def test_bad_requests_become_error_lines_and_the_rest_is_answered(self, capsys) -> None:
        llm = FakeLLM(max_model_len=20)
        reqs = [Request(f"r{i}", "/v1/chat/completions", chat(f"r{i}", f"hello {i}")["body"]) for i in range(16)]
        reqs[3].body["temperature"] = -1                                # refused while building the params
        reqs[5].body["messages"][0]["content"] = "RAISE"                 # refused by the engine
        reqs[11].body["messages"][0]["content"] = "word " * 30          # over the context length
        outs = answer_all(self.processor(llm), reqs)
        bad = {o.custom_id: (o.status_code, o.error_code, o.retryable) for o in outs if not o.ok}
        assert bad == {"r3": (400, "invalid_request", False), "r5": (400, "invalid_request", False),
                       "r11": (400, "context_length_exceeded", False)}
        assert "temperature must be non-negative" in next(o for o in outs if o.custom_id == "r3").error_message
        assert llm.llm_engine.answered == 13

    def test_success_line_is_openai_shaped_with_usage(self) -> None:
        (out,) = answer_all(self.processor(), [Request("a", "/v1/chat/completions",
                                                       chat("a", "one two three", max_tokens=2, n=2)["body"])])
        body = orjson.loads(out.raw)["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert [c["message"]["content"] for c in body["choices"]] == ["echo: one", "echo: one"]
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                 "prompt_tokens_details": {"cached_tokens": 0}}

    def test_completions_take_one_prompt(self) -> None:
        proc = self.processor()
        outs = {o.custom_id: o for o in answer_all(proc, [
            Request("s", "/v1/completions", {"model": "tiny", "prompt": "a b", "max_tokens": 5}),
            Request("l", "/v1/completions", {"model": "tiny", "prompt": ["c d e"]}),
            Request("t", "/v1/completions", {"model": "tiny", "prompt": [7, 8]}),
            Request("many", "/v1/completions", {"model": "tiny", "prompt": ["x", "y"]})])}
        texts = {cid: orjson.loads(o.raw)["response"]["body"]["choices"][0]["text"] for cid, o in outs.items()
                 if o.ok}
        assert texts == {"s": "echo: a b", "l": "echo: c d e", "t": "echo: 7 8"}
        assert outs["many"].status_code == 400 and "one string" in outs["many"].error_message

    def test_body_overrides_defaults(self) -> None:
        known = frozenset({"max_tokens", "temperature", "top_p", "seed"})
        body = {"model": "x", "max_completion_tokens": 7, "temperature": 0.2, "user": "u", "top_k": 5}
        assert sampling_kwargs(body, {"temperature": 1.0, "top_p": 0.9}, known) == {
            "max_tokens": 7, "temperature": 0.2, "top_p": 0.9}
        assert sampling_kwargs({}, {}, known) == {"max_tokens": None}

    def test_response_format_maps_to_structured_outputs(self) -> None:
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        assert structured_outputs_kwargs(
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
        ) == {"json": schema}
        assert structured_outputs_kwargs({"response_format": {"type": "json_object"}}) == {
            "json_object": True}
        assert structured_outputs_kwargs({}) is None

    def test_embeddings_regrouped_per_request_float_and_base64(self) -> None:
        llm = FakeLLM()
        cfg = RunnerConfig(input="-", output="-", model="emb")
        proc = fake_processor(cfg, "/v1/embeddings", llm)
        chunk = [Request("e1", "/v1/embeddings", {"model": "emb", "input": ["a b", "c"]}),
                 Request("e2", "/v1/embeddings", {"model": "emb", "input": "x y z", "encoding_format": "base64",
                                                  "dimensions": 2}),
                 Request("e3", "/v1/embeddings", {"model": "emb", "input": [5, 6, 7, 8]}),
                 Request("e4", "/v1/embeddings", {"model": "other", "input": "a"})]
        lines = [orjson.loads(x) for x in proc.pool_chunk(chunk)]
        assert llm.calls == [4]  # one engine call for all the inputs of the chunk
        e1, e2, e3 = (x["response"]["body"] for x in lines[:3])
        assert [d["embedding"][0] for d in e1["data"]] == [2.0, 1.0] and e1["usage"]["prompt_tokens"] == 3
        assert struct.unpack("<2f", base64.b64decode(e2["data"][0]["embedding"])) == pytest.approx((3.0, 3.1))
        assert e3["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
        assert lines[3]["response"]["status_code"] == 404
        assert isinstance(proc.make_pooling(), FakePooling)

    def test_scores_and_reranks_as_vllm_answers_them(self) -> None:
        llm = FakeLLM()
        proc = fake_processor(RunnerConfig(input="-", output="-", model="ce"), "/v1/rerank", llm)
        chunk = [Request("s1", "/score", {"model": "ce", "text_1": "red fox", "text_2": ["a red fox", "blue"]}),
                 Request("s2", "/v1/score", {"model": "ce", "queries": ["a", "b c"], "documents": ["a", "c"]}),
                 Request("rr", "/v1/rerank", {"model": "ce", "query": "red fox", "top_n": 2,
                                              "documents": ["blue sky", "a red fox", "red car"]}),
                 Request("bad", "/score", {"model": "ce", "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}),
                 Request("emb", "/v1/embeddings", {"model": "ce", "input": "a"})]
        lines = {x["custom_id"]: x["response"] for x in map(orjson.loads, proc.pool_chunk(chunk))}
        assert llm.calls == [7]  # every pair of the chunk in one LLM.score call
        s1 = lines["s1"]["body"]
        assert s1["object"] == "list" and [d["score"] for d in s1["data"]] == [1.0, 0.0]
        assert s1["data"][0] == {"index": 0, "object": "score", "score": 1.0} and s1["usage"]["prompt_tokens"] == 5 + 3
        assert [d["score"] for d in lines["s2"]["body"]["data"]] == [1.0, 0.5]  # N -> N
        rr = lines["rr"]["body"]
        assert [(r["index"], r["relevance_score"], r["document"]["text"]) for r in rr["results"]] == [
            (1, 1.0, "a red fox"), (2, 0.5, "red car")]  # by relevance, top_n of them
        assert set(rr) == {"id", "model", "usage", "results"}
        assert lines["bad"]["status_code"] == 400 and "pair" in lines["bad"]["body"]["error"]["message"]
        assert lines["emb"]["status_code"] == 400  # a scoring engine does not embed

    def test_a_request_the_engine_drops_is_a_retryable_error_not_a_hang(self) -> None:
        llm = FakeLLM()
        proc = self.processor(llm)
        assert proc.submit(Request("kept", "/v1/chat/completions", chat("kept", "a")["body"])) is None
        assert proc.submit(Request("lost", "/v1/chat/completions", chat("lost", "b c d e f g")["body"])) is None
        while llm.llm_engine.answered == 0:
            answered = proc.step()
        llm.llm_engine.running.clear()  # the engine forgot the other request
        lines = answered + proc.step()
        outs = {o.custom_id: o for o in (parse_output_line(x.rstrip(b"\n")) for x in lines)}
        assert outs["kept"].ok and (outs["lost"].status_code, outs["lost"].retryable) == (500, True)
        assert proc.in_flight == 0

    def test_unsupported_endpoint_is_an_error_line(self) -> None:
        line = self.processor().submit(Request("x", "/v1/responses", {"model": "tiny", "input": "hi"}))
        assert line is not None
        out = parse_output_line(line.rstrip(b"\n"))
        assert not out.ok and out.status_code == 400 and "/v1/responses" in out.error_message


class TestMain:
    def run_main(self, tmp_path: Path, config: dict) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(config))
        return subprocess.run([sys.executable, "-m", "airflow_provider_synth.engine.vllm", "--config", str(path)],
                              capture_output=True, text=True, timeout=120)

    def test_interpreter_without_vllm_fails_before_any_request(self, tmp_path: Path, cfg: RunnerConfig) -> None:
        pytest.importorskip("airflow")  # Airflow's interpreter, which has no vLLM
        proc = self.run_main(tmp_path, {"input": cfg.input, "output": cfg.output, "model": "tiny"})
        assert proc.returncode == EXIT_NO_VLLM
        event = json.loads(proc.stdout.splitlines()[-1])
        assert event["kind"] == "vllm_missing" and "scripts/install_vllm.sh" in event["message"]
        assert not Path(cfg.output).exists() or Path(cfg.output).read_bytes() == b""

    def test_missing_input_is_a_config_error(self, tmp_path: Path) -> None:
        proc = self.run_main(tmp_path, {"input": str(tmp_path / "nope.jsonl"), "output": "o", "model": "m"})
        assert proc.returncode == EXIT_BAD_CONFIG and "does not exist" in proc.stdout


def test_runner_stops_when_its_parent_dies(tmp_path: Path) -> None:
    """A worker killed with SIGKILL cannot run on_kill: the runner notices and stops its engine."""
    import os
    import signal
    import time

    rows = [chat(f"r{i}", f"hello {i}") for i in range(200)]  # 40 s of work at 0.2 s per request
    cfg = {"input": str(write_requests(tmp_path / "in.jsonl", rows)), "output": str(tmp_path / "out.jsonl"),
           "model": "tiny", "chunk_size": 1}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'airflow_provider_synth.testing.vllm', '--config', "
        f"{str(tmp_path / 'cfg.json')!r}], start_new_session=True, stdout=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "SYNTH_FAKE_VLLM_DELAY": "0.2"})
    runner_pid = int(parent.stdout.readline())
    started = time.monotonic()
    out = tmp_path / "out.jsonl"
    while not (out.exists() and b"\n" in out.read_bytes()):  # killed mid-run, once it has answered something
        assert time.monotonic() - started < 60, "the runner never answered"
        time.sleep(0.05)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(runner_pid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{runner_pid}/stat").read_text().split()[2] == "Z":
            break  # exited; a zombie until init reaps it
        time.sleep(0.1)
    else:
        os.killpg(runner_pid, signal.SIGKILL)
        pytest.fail("the runner outlived its parent")
    assert 0 < len(output_ids(tmp_path / "out.jsonl")) < 100


class TestShutdown:
    class Client:
        def __init__(self, fail: bool = False) -> None:
            self.fail = fail
            self.calls: list[float | None] = []

        def shutdown(self, timeout: float | None = None) -> None:
            self.calls.append(timeout)
            if self.fail:
                raise RuntimeError("teardown broke")

    def llm(self, client: object) -> object:
        from types import SimpleNamespace
        return SimpleNamespace(llm_engine=SimpleNamespace(engine_core=client))

    def test_stops_the_engine_core(self) -> None:
        client = self.Client()
        shutdown_engine(self.llm(client), timeout=3)
        assert client.calls == [3]

    def test_a_failed_teardown_is_a_warning_event(self, capsys) -> None:
        shutdown_engine(self.llm(self.Client(fail=True)))
        event = json.loads(capsys.readouterr().out)
        assert event[EVENT_KEY] == "warning" and "teardown broke" in event["message"]

    def test_an_engine_without_a_client_is_left_alone(self, capsys) -> None:
        shutdown_engine(FakeLLM())
        shutdown_engine(self.llm(object()))  # an engine core without shutdown()
        assert capsys.readouterr().out == "", "nothing called, nothing reported"

