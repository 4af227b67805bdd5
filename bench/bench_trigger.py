"""Benchmark: N deferrable batch triggers sharing one event loop, as in one triggerer process.

Each trigger waits on one batch of the local Batch API server (run in its own process), which answers every
poll after 50 ms and completes each batch 3 s after its first poll; ``poll_interval=1``. A 10 ms heartbeat on
the loop records the worst lag. The same run measures the official provider's ``OpenAIBatchTrigger``
(apache-airflow-providers-openai), which calls the sync client inside ``run()``, and our
``AnthropicBatchTrigger`` over the same number of Message Batches (one request each, same server schedule).

    .venv/bin/python bench/bench_trigger.py                  # N = 100 and 1000, official at both
    .venv/bin/python bench/bench_trigger.py --n 100 --official-max-n 100
    .venv/bin/python bench/bench_trigger.py --n 100 --official-max-n 0 --no-anthropic

The last line printed is one JSON object: ``{"runs": [{"n", "ours_wall_s", "ours_lag_max_s", ...}], ...}``,
with the N = 1,000 figures also at top level.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

API_KEY = "sk-bench-local"
POLL_DELAY_S = 0.05
COMPLETE_AFTER_S = 3.0
POLL_INTERVAL_S = 1.0
HEARTBEAT_S = 0.01


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start the local Batch API server in its own process (so it does not share our GIL)."""
    port_file = tmp / "port"
    cmd = [
        sys.executable, "-m", "airflow_provider_synth.server", "--port", "0", "--port-file", str(port_file),
        "--poll-delay-s", str(POLL_DELAY_S), "--complete-after-first-poll-s", str(COMPLETE_AFTER_S),
        "--validating-s", "0", "--in-progress-s", "3600", "--log-level", "WARNING",
    ]
    env = {**os.environ, "SYNTH_SERVER_API_KEY": API_KEY}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the local Batch API server did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}/v1"


def create_batches(base_url: str, n: int, tmp: Path) -> list[str]:
    """Create ``n`` batches over one small uploaded file (not polled: their clock starts at the first poll)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=API_KEY, max_retries=5)
    src = tmp / "requests.jsonl"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    src.write_text(json.dumps({"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    with src.open("rb") as fp:
        file_id = client.files.create(file=("requests.jsonl", fp), purpose="batch").id

    def create(_: int) -> str:
        return client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(create, range(n)))
    client.close()
    return ids


def create_message_batches(base_url: str, n: int) -> list[str]:
    """Create ``n`` Message Batches of one request each through the anthropic SDK (not polled yet)."""
    import anthropic

    client = anthropic.Anthropic(base_url=base_url.removesuffix("/v1"), api_key=API_KEY, max_retries=5)
    params = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}

    def create(_: int) -> str:
        return client.messages.batches.create(requests=[{"custom_id": "r0", "params": params}]).id  # type: ignore[list-item]

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(create, range(n)))
    client.close()
    return ids


async def heartbeat(lags: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """Every 10 ms, record (when, how late) the loop let the heartbeat run."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        expected = loop.time() + HEARTBEAT_S
        await asyncio.sleep(HEARTBEAT_S)
        now = loop.time()
        lags.append((now, max(0.0, now - expected)))


class IterationCPU:
    """The most CPU time one loop iteration took (callbacks run back to back between two selector polls).

    Unlike the heartbeat's wall-clock lag, it does not count time the OS gave to other processes, so it
    separates what the triggers cost the loop from how busy the machine is.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.max_s = 0.0
        self._run_once = loop._run_once  # type: ignore[attr-defined]
        loop._run_once = self._timed  # type: ignore[attr-defined]

    def _timed(self) -> None:
        start = time.thread_time()
        self._run_once()
        self.max_s = max(self.max_s, time.thread_time() - start)


def server_cpu_s() -> float:
    """CPU seconds the local server process has used so far (it competes with the triggers for the cores)."""
    import psutil

    times = psutil.Process(SERVER_PID[0]).cpu_times() if SERVER_PID else None
    return times.user + times.system if times else 0.0


SERVER_PID: list[int] = []


class GCPauses:
    """The longest garbage-collector pause while installed (a full collection stops the loop like any callback)."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.max_s = max(self.max_s, time.perf_counter() - self._start)

    def remove(self) -> None:
        gc.callbacks.remove(self._callback)


async def run_triggers(triggers: list[Any], cap_s: float) -> dict[str, Any]:
    """Run every trigger to its first event on this loop, with the heartbeat; stop at ``cap_s``."""
    loop = asyncio.get_running_loop()
    iteration_cpu = IterationCPU(loop)
    gc_pauses = GCPauses()
    lags: list[tuple[float, float]] = []
    stop = asyncio.Event()
    beat = asyncio.create_task(heartbeat(lags, stop))
    await asyncio.sleep(0.05)
    start = loop.time()
    cpu_start, server_cpu_start = time.process_time(), server_cpu_s()
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def one(trigger: Any) -> None:
        async for event in trigger.run():
            latencies.append(loop.time() - start)
            status = event.payload.get("status", "?")
            statuses[status] = statuses.get(status, 0) + 1
            return

    tasks = [asyncio.create_task(one(t)) for t in triggers]
    done, pending = await asyncio.wait(tasks, timeout=cap_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = loop.time() - start
    from airflow_provider_synth.hooks.openai_pool import close_loop_pool

    await close_loop_pool()
    cpu = time.process_time() - cpu_start
    stop.set()
    await beat
    gc_pauses.remove()
    worst_at, worst = max(lags, key=lambda lag: lag[1], default=(start, 0.0))
    delays = [lag for _, lag in lags]
    return {
        "wall_s": round(wall, 3),
        "lag_max_s": round(worst, 3),
        "lag_max_at_s": round(worst_at - start, 3),
        "loop_iteration_cpu_max_s": round(iteration_cpu.max_s, 3),
        "gc_pause_max_s": round(gc_pauses.max_s, 3),
        "lag_p99_s": round(statistics.quantiles(delays, n=100)[98], 3) if len(delays) >= 100 else None,
        "events": len(latencies),
        "event_latency_max_s": round(max(latencies, default=0.0), 3),
        "event_latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "statuses": statuses,
        "cpu_s": round(cpu, 3),
        "server_cpu_s": round(server_cpu_s() - server_cpu_start, 3),
        "capped": bool(pending),
    }


def ours(batch_ids: list[str]) -> list[Any]:
    from airflow_provider_synth.triggers.openai_batch import OpenAIBatchTrigger

    return [OpenAIBatchTrigger("bench_synth", [b], poll_interval=POLL_INTERVAL_S) for b in batch_ids]


def anthropic_triggers(batch_ids: list[str]) -> list[Any]:
    from airflow_provider_synth.triggers.anthropic import AnthropicBatchTrigger

    return [AnthropicBatchTrigger("bench_anthropic", [b], poll_interval=POLL_INTERVAL_S) for b in batch_ids]


def official(batch_ids: list[str]) -> list[Any]:
    from airflow.providers.openai.triggers.openai import OpenAIBatchTrigger

    return [OpenAIBatchTrigger("bench_official", b, poll_interval=POLL_INTERVAL_S, timeout=3600) for b in batch_ids]


def set_connections(base_url: str) -> None:
    from airflow.sdk import Connection

    for conn_id, conn_type, host in (("bench_synth", "synth_openai", base_url), ("bench_official", "openai", base_url),
                                     ("bench_anthropic", "anthropic", base_url.removesuffix("/v1"))):
        conn = Connection(conn_id=conn_id, conn_type=conn_type, password=API_KEY, host=host)
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = conn.as_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="triggers per run")
    parser.add_argument("--official-max-n", type=int, default=1000, help="largest N the official trigger runs at")
    parser.add_argument("--official-cap-s", type=float, default=240.0, help="stop an official run after this long")
    parser.add_argument("--cap-s", type=float, default=120.0, help="stop one of our runs after this long")
    parser.add_argument("--no-anthropic", action="store_true", help="skip the AnthropicBatchTrigger runs")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after start-up, as long-running servers do (Airflow's triggerer does not)")
    args = parser.parse_args()
    for name in ("httpx2", "httpx", "openai", "anthropic", "airflow_provider_synth", "airflow"):
        logging.getLogger(name).setLevel(logging.WARNING)

    runs = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        proc, base_url = start_server(tmp)
        SERVER_PID.append(proc.pid)
        try:
            set_connections(base_url)
            # a running triggerer has Airflow's connection machinery imported already: warm both up, unmeasured
            warm = create_batches(base_url, 2, tmp)
            warm_triggers = ours(warm[:1]) + official(warm[1:])
            if not args.no_anthropic:
                warm_triggers += anthropic_triggers(create_message_batches(base_url, 1))
            asyncio.run(run_triggers(warm_triggers, args.cap_s))
            if args.gc_freeze:
                gc.collect()
                gc.freeze()
            for n in args.n:
                run: dict[str, Any] = {"n": n}
                target = 2 * (COMPLETE_AFTER_S + POLL_INTERVAL_S + POLL_DELAY_S)
                res = asyncio.run(run_triggers(ours(create_batches(base_url, n, tmp)), args.cap_s))
                run.update({"ours_wall_s": res["wall_s"], "ours_lag_max_s": res["lag_max_s"],
                            "ours_loop_iteration_cpu_max_s": res["loop_iteration_cpu_max_s"], "ours": res,
                            "ours_all_events_within_s": target,
                            "ours_ok": res["events"] == n and res["event_latency_max_s"] <= target})
                print(f"ours      n={n}: {json.dumps(res)}", file=sys.stderr, flush=True)
                if not args.no_anthropic:
                    res = asyncio.run(run_triggers(anthropic_triggers(create_message_batches(base_url, n)),
                                                   args.cap_s))
                    run.update({"anthropic_wall_s": res["wall_s"], "anthropic_lag_max_s": res["lag_max_s"],
                                "anthropic_loop_iteration_cpu_max_s": res["loop_iteration_cpu_max_s"],
                                "anthropic": res,
                                "anthropic_ok": res["events"] == n and res["event_latency_max_s"] <= target})
                    print(f"anthropic n={n}: {json.dumps(res)}", file=sys.stderr, flush=True)
                if n <= args.official_max_n:
                    res = asyncio.run(run_triggers(official(create_batches(base_url, n, tmp)), args.official_cap_s))
                    run.update({"official_wall_s": res["wall_s"], "official_lag_max_s": res["lag_max_s"],
                                "official_loop_iteration_cpu_max_s": res["loop_iteration_cpu_max_s"],
                                "official": res})
                    print(f"official  n={n}: {json.dumps(res)}", file=sys.stderr, flush=True)
                else:
                    run.update({"official_wall_s": None, "official_lag_max_s": None, "official": "not run"})
                runs.append(run)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    summary: dict[str, Any] = {
        "bench": "trigger",
        "poll_delay_s": POLL_DELAY_S,
        "complete_after_first_poll_s": COMPLETE_AFTER_S,
        "poll_interval_s": POLL_INTERVAL_S,
        "cpus": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "gc_freeze": args.gc_freeze,
        "runs": runs,
    }
    largest = runs[-1]
    summary.update({k: largest.get(k) for k in
                    ("n", "ours_wall_s", "ours_lag_max_s", "anthropic_wall_s", "anthropic_lag_max_s",
                     "official_wall_s", "official_lag_max_s")})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
