"""Benchmark the local Batch API server, run as users run it (its own process, the CLI).

1. ``--pollers`` concurrent ``GET /v1/batches/{id}`` (each answered after ``poll_delay_s`` = 50 ms): wall time,
   latency p50/p99/max, errors.
2. One chat batch of ``--requests`` lines through the real ``openai`` SDK: upload, create, run to completion
   (``in_progress_s`` = 0), download the output; seconds per phase and the server's peak RSS.

    .venv/bin/python bench/bench_server.py [--pollers 1000] [--requests 50000]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
from openai import OpenAI

KEY = "sk-bench"


def start_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / "port"
    cmd = [sys.executable, "-m", "airflow_provider_synth.server", "--port", "0", "--port-file", str(port_file),
           "--poll-delay-s", "0.05", "--validating-s", "0", "--in-progress-s", "0", "--finalizing-s", "0",
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env={**os.environ, "SYNTH_SERVER_API_KEY": KEY}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text()}/v1"


def chat_file(path: Path, n: int) -> int:
    with path.open("wb") as fp:
        for i in range(n):
            body = {"model": "gpt-4o-mini", "messages": [
                {"role": "system", "content": "You write short product descriptions."},
                {"role": "user", "content": f"Describe product number {i} in two sentences."}]}
            fp.write(orjson.dumps({"custom_id": f"req-{i:06d}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": body}) + b"\n")
    return path.stat().st_size


async def pollers(base_url: str, batch_id: str, n: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {KEY}"}) as session:

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with session.get(f"{base_url}/batches/{batch_id}") as resp:
                    await resp.read()
                    errors += resp.status != 200
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "pollers": n,
        "poll_wall_s": round(wall, 3),
        "poll_latency_p50_s": round(statistics.median(latencies), 3),
        "poll_latency_p99_s": round(latencies[int(len(latencies) * 0.99) - 1], 3),
        "poll_latency_max_s": round(latencies[-1], 3),
        "poll_errors": errors,
    }


def big_batch(client: OpenAI, tmp: Path, n: int, server: psutil.Process) -> dict[str, Any]:
    src = tmp / "requests.jsonl"
    size = chat_file(src, n)
    peak = server.memory_info().rss
    t0 = time.perf_counter()
    with src.open("rb") as fp:
        uploaded = client.files.create(file=("requests.jsonl", fp), purpose="batch")
    t1 = time.perf_counter()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    t2 = time.perf_counter()
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        peak = max(peak, server.memory_info().rss)
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    t3 = time.perf_counter()
    out = tmp / "output.jsonl"
    with client.files.with_streaming_response.content(batch.output_file_id) as resp:  # type: ignore[arg-type]
        resp.stream_to_file(out)
    t4 = time.perf_counter()
    peak = max(peak, server.memory_info().rss)
    lines = sum(1 for _ in out.open("rb"))
    return {
        "requests": n,
        "input_mb": round(size / 1e6, 1),
        "status": batch.status,
        "output_lines": lines,
        "upload_s": round(t1 - t0, 2),
        "create_s (validates the file)": round(t2 - t1, 2),
        "run_s": round(t3 - t2, 2),
        "download_s": round(t4 - t3, 2),
        "output_mb": round(out.stat().st_size / 1e6, 1),
        "server_rss_peak_mb": round(peak / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pollers", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        proc, base_url = start_server(tmp)
        try:
            server = psutil.Process(proc.pid)
            client = OpenAI(base_url=base_url, api_key=KEY, timeout=600)
            idle_rss = server.memory_info().rss
            small = tmp / "one.jsonl"
            chat_file(small, 1)
            with small.open("rb") as fp:
                file_id = client.files.create(file=("one.jsonl", fp), purpose="batch").id
            batch_id = client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
            figures: dict[str, Any] = {"server_rss_idle_mb": round(idle_rss / 1e6, 1)}
            cpu0 = sum(server.cpu_times()[:2])
            figures.update(asyncio.run(pollers(base_url, batch_id, args.pollers)))
            figures["server_cpu_ms_per_poll"] = round((sum(server.cpu_times()[:2]) - cpu0) * 1000 / args.pollers, 3)
            figures.update(big_batch(client, tmp, args.requests, server))
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
