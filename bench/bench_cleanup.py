"""Clean-up throughput: delete this provider's old files from an account that also holds other teams' files.

Fills the local Batch API server with N files (half ours, half foreign), ages them, then runs
``clean_up_batch_files`` as a dry run, then for real with one delete in flight and with the default
concurrency, each DELETE answered after ``--latency-ms`` (a real API's round trip). Checks that exactly our
files went. Last line: one JSON object.

    .venv/bin/python bench/bench_cleanup.py --files 1000 --latency-ms 50
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="synth-bench-"))

from airflow.sdk import Connection  # noqa: E402

from airflow_provider_synth.hooks.openai import OpenAIBatchHook  # noqa: E402
from airflow_provider_synth.runs.cleanup import DELETE_CONCURRENCY, clean_up_batch_files  # noqa: E402
from airflow_provider_synth.server.server import BatchServer, ServerConfig  # noqa: E402

KEY = "ab" * 16


def fill(hook: OpenAIBatchHook, server: BatchServer, n: int, offset: int) -> tuple[set[str], set[str]]:
    ours, foreign = set(), set()
    for i in range(offset, offset + n):
        mine = i % 2 == 0
        name = f"synth-{KEY}-s{i:05d}-r0.jsonl" if mine else f"team-{i}.jsonl"
        file = hook.client.files.create(file=(name, io.BytesIO(b"{}\n"), "application/jsonl"), purpose="batch")
        (ours if mine else foreign).add(file.id)
    server.age([*ours, *foreign], 10 * 86400)
    return ours, foreign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    with BatchServer(ServerConfig()) as server:
        os.environ["AIRFLOW_CONN_BENCH"] = Connection(conn_id="bench", conn_type="synth_openai",
                                                      password="sk-bench-key", host=server.base_url).as_json()
        hook = OpenAIBatchHook("bench")
        server.add_fault("DELETE /v1/files/*", kind="delay", delay_s=args.latency_ms / 1000, times=None)
        figures: dict[str, float | int] = {"files": args.files, "latency_ms": args.latency_ms}
        for label, concurrency in (("serial", 1), ("concurrent", DELETE_CONCURRENCY)):
            ours, foreign = fill(hook, server, args.files, offset=0 if label == "serial" else args.files)
            start = time.perf_counter()
            dry = clean_up_batch_files(hook, 7, dry_run=True)
            figures["dry_run_s"] = round(time.perf_counter() - start, 3)
            start = time.perf_counter()
            done = clean_up_batch_files(hook, 7, concurrency=concurrency)
            figures[f"{label}_delete_s"] = round(time.perf_counter() - start, 3)
            left = {f.id for f in hook.list_files()}
            assert dry.deleted == done.deleted == len(ours) and not (ours & left) and foreign <= left
            figures["deleted_per_run"] = done.deleted
        figures["concurrency"] = DELETE_CONCURRENCY
        figures["speedup"] = round(float(figures["serial_delete_s"]) / float(figures["concurrent_delete_s"]), 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
