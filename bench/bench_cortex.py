"""Benchmark the Cortex backend end to end on fakesnow: validate, stage, one statement per chunk, read back.

The model is the fake UDF (instant), so the figures measure this provider's own work and the connector path
(bulk staging, set-based statements, streaming read-back, merge), not Cortex. A second run of the same task
(a retry after everything was answered) shows the resume cost: no model call, statements skipped.

    .venv/bin/python bench/bench_cortex.py [--n 20000] [--chunk-size 5000]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def write_requests(path: Path, n: int) -> None:
    with path.open("w") as fp:
        for i in range(n):
            body = {"model": "llama3.1-8b", "temperature": 0.3, "max_tokens": 200,
                    "messages": [{"role": "user", "content": f"Write a product description for item {i}."}]}
            if i % 10 == 0:
                body["messages"].insert(0, {"role": "system", "content": "You write marketing copy."})
            fp.write(json.dumps({"custom_id": f"req-{i:08d}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}) + "\n")


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--chunk-size", type=int, default=5_000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-cortex-"))
    os.environ["AIRFLOW_CONN_SNOWFLAKE_DEFAULT"] = json.dumps(
        {"conn_type": "snowflake", "login": "u", "password": "p", "schema": "PUBLIC",
         "extra": {"account": "acct", "database": "SYNTH_DB", "warehouse": "WH"}})
    from airflow_provider_synth.operators.cortex import CortexBatchOperator
    from airflow_provider_synth.runs import cortex_mapping as cortex

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fakes the tests use
    from fakes.cortex import FakeCortex

    requests = work / "requests.jsonl"
    write_requests(requests, args.n)
    t0 = time.perf_counter()
    cortex.check_requests(requests)
    validate_s = time.perf_counter() - t0

    ti = SimpleNamespace(dag_id="bench", task_id="cortex", run_id="r1", map_index=-1, try_number=1)
    op = CortexBatchOperator(task_id="cortex", input_path=str(requests), output_path=str(work / "out"),
                             chunk_size=args.chunk_size, deferrable=False, keep_staging_tables=True)
    with FakeCortex() as fake:
        t0 = time.perf_counter()
        manifest = op.execute({"ti": ti})  # type: ignore[arg-type]
        first_s = time.perf_counter() - t0
        calls = len(fake.calls)
        ti.try_number = 2
        t0 = time.perf_counter()
        again = op.execute({"ti": ti})  # type: ignore[arg-type]
        resume_s = time.perf_counter() - t0
        resume_calls = len(fake.calls) - calls
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "benchmark": "cortex_fakesnow", "requests": args.n, "chunk_size": args.chunk_size,
        "statements": len(manifest["query_ids"]), "succeeded": manifest["succeeded"],
        "validate_s": round(validate_s, 3), "validate_req_per_s": round(args.n / validate_s),
        "run_s": round(first_s, 3), "run_req_per_s": round(args.n / first_s), "model_calls": calls,
        "resume_s": round(resume_s, 3), "resume_model_calls": resume_calls,
        "resume_succeeded": again["succeeded"], "peak_rss_mb": round(peak_rss_mb, 1),
        "results_bytes": Path(manifest["results_path"]).stat().st_size,
    }


if __name__ == "__main__":
    figures = main()
    sys.stdout.write(json.dumps(figures) + "\n")
