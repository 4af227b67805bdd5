"""Benchmark the batch core: build, validate + split, then merge, at 1,000,000 and 100,000 chat requests.

Each size runs in its own process so its peak RSS is its own. The naive baseline (stdlib ``json`` line by line
into an in-memory list, then written out) runs in the same invocation on the same files.

    .venv/bin/python bench/bench_core.py [--n 1000000] [--small 100000] [--workdir DIR]

Before each timed phase the script calls ``os.sync()``: the previous phase's dirty pages are written back first, so
no phase is charged for another's deferred I/O (on this VM that writeback costs the writer seconds of system time).

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

TOPICS = ["astronomy", "baking", "chess", "databases", "ecology", "finance", "geology", "history"]


def records(n: int) -> Any:
    for i in range(n):
        yield {"id": f"rec-{i:08d}", "topic": TOPICS[i % len(TOPICS)], "level": i % 5}


def build(path: str, n: int) -> None:
    from airflow_provider_synth.batch import build_requests, write_requests

    reqs = build_requests(
        records(n), model="gpt-4o-mini", id_field="id", system="You write short, factual quiz questions.",
        prompt_template="Write one {topic} question at difficulty {level} of 5, with its answer and a one-line "
                        "explanation of why the answer is right. Keep it under sixty words.",
        params={"temperature": 0.7, "max_completion_tokens": 200},
    )
    with open(path, "wb") as fp:
        write_requests(reqs, fp)


def fake_outputs(shard_paths: list[str], out_dir: str) -> list[str]:
    """One output file per shard, shuffled; 1% HTTP 500s in the error file, 0.1% missing."""
    from airflow_provider_synth.batch.jsonl import iter_jsonl, loads
    from airflow_provider_synth.batch.results import error_line, success_line

    rng = random.Random(7)
    outs = []
    for i, path in enumerate(shard_paths):
        lines = []
        with open(path, "rb") as fp:
            for _, raw in iter_jsonl(fp):
                cid = loads(raw)["custom_id"]
                r = rng.random()
                if r < 0.001:
                    continue
                if r < 0.011:
                    lines.append(error_line(cid, "server_error", "The server had an error", status_code=500))
                else:
                    body = {"id": "chatcmpl-" + cid, "object": "chat.completion", "created": 1700000000,
                            "model": "gpt-4o-mini-2024-07-18",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content":
                                         f"Q: a question about {cid}? A: an answer."}, "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 52, "completion_tokens": 18, "total_tokens": 70,
                                      "prompt_tokens_details": {"cached_tokens": 0},
                                      "completion_tokens_details": {"reasoning_tokens": 0}}}
                    lines.append(success_line(cid, body))
        rng.shuffle(lines)
        out = os.path.join(out_dir, f"out-{i:05d}.jsonl")
        with open(out, "wb") as fp:
            fp.write(b"\n".join(lines) + b"\n")
        outs.append(out)
    return outs


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(n: int, work: str) -> dict[str, Any]:
    from airflow_provider_synth.batch import ShardOutputs, merge_shards, split_requests

    inp = os.path.join(work, "requests.jsonl")
    t0 = time.perf_counter()
    build(inp, n)
    build_s = time.perf_counter() - t0
    in_bytes = os.path.getsize(inp)
    shard_dir = os.path.join(work, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    rss_before_split = rss_mb()
    os.sync()  # the build's dirty pages are written back before the clock starts, not charged to the split
    t0, c0 = time.perf_counter(), time.process_time()
    res = split_requests(inp, lambda i: open(os.path.join(shard_dir, f"shard-{i:05d}.jsonl"), "wb"))
    split_s, split_cpu = time.perf_counter() - t0, time.process_time() - c0
    shard_paths = [os.path.join(shard_dir, f"shard-{s.index:05d}.jsonl") for s in res.shards]
    # the fake service's output files are made in another process: their memory is not ours
    subprocess.run([sys.executable, __file__, "--child", "fake", "--workdir", work, *shard_paths], check=True)
    outs = sorted(os.path.join(work, p) for p in os.listdir(work) if p.startswith("out-"))
    out_bytes = sum(os.path.getsize(p) for p in outs)
    os.sync()  # likewise the split's and the fake outputs' pages
    t0, c0 = time.perf_counter(), time.process_time()
    with open(os.path.join(work, "results.jsonl"), "wb") as rf, open(os.path.join(work, "failures.jsonl"), "wb") as ff:
        acct = merge_shards([ShardOutputs(p, [o]) for p, o in zip(shard_paths, outs, strict=True)], rf, ff)
    merge_s, merge_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n": n, "split_cpu_s": split_cpu, "merge_cpu_s": merge_cpu,
            "split_mb_s_cpu": in_bytes / 1e6 / split_cpu, "merge_mb_s_cpu": out_bytes / 1e6 / merge_cpu, "input_mb": in_bytes / 1e6, "output_mb": out_bytes / 1e6, "shards": len(res.shards),
            "build_s": build_s, "split_s": split_s, "merge_s": merge_s,
            "split_mb_s": in_bytes / 1e6 / split_s, "merge_mb_s": out_bytes / 1e6 / merge_s,
            "succeeded": acct.succeeded, "failed": acct.failed, "missing": acct.missing,
            "rss_before_split_mb": rss_before_split, "peak_rss_mb": rss_mb()}


def run_naive(work: str) -> dict[str, Any]:
    """stdlib json, line by line into in-memory lists, then written out: the baseline."""
    inp = os.path.join(work, "requests.jsonl")
    os.sync()  # each phase starts with no other phase's writes pending, as in run_ours
    t0 = time.perf_counter()
    rows = []
    with open(inp) as fp:
        for line in fp:
            row = json.loads(line)
            assert row["method"] == "POST" and row["body"]["messages"]
            rows.append(row)
    ids = [r["custom_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    shard_dir = os.path.join(work, "naive_shards")
    os.makedirs(shard_dir, exist_ok=True)
    for k in range(0, len(rows), 50_000):
        with open(os.path.join(shard_dir, f"{k}.jsonl"), "w") as fp:
            for r in rows[k:k + 50_000]:
                fp.write(json.dumps(r) + "\n")
    split_s = time.perf_counter() - t0
    del rows
    outs = sorted(p for p in os.listdir(work) if p.startswith("out-"))
    os.sync()
    t0 = time.perf_counter()
    by_id = {}
    for p in outs:
        with open(os.path.join(work, p)) as fp:
            for line in fp:
                if line.strip():
                    o = json.loads(line)
                    by_id[o["custom_id"]] = o
    with open(os.path.join(work, "naive_results.jsonl"), "w") as rf, open(os.path.join(work, "naive_failures.jsonl"), "w") as ff:
        for cid in ids:
            o = by_id.get(cid)
            if o is not None and o["response"] and o["response"]["status_code"] == 200:
                rf.write(json.dumps(o) + "\n")
            else:
                ff.write(json.dumps({"custom_id": cid, "error": o and (o.get("error") or o["response"]["body"])}) + "\n")
    merge_s = time.perf_counter() - t0
    return {"naive_split_s": split_s, "naive_merge_s": merge_s, "naive_peak_rss_mb": rss_mb()}


def child(args: argparse.Namespace) -> None:
    work = args.workdir
    if args.mode == "fake":
        fake_outputs(args.shards, work)
        return
    result = run_ours(args.n, work) if args.mode == "ours" else run_naive(work)
    print(json.dumps(result))


def spawn(mode: str, n: int, work: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(n), "--workdir", work],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=100_000)
    p.add_argument("--workdir", default=None)
    p.add_argument("--child", dest="mode", default=None)
    p.add_argument("shards", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        child(args)
        return
    base = args.workdir or tempfile.mkdtemp(prefix="synth-bench-")
    try:
        small_dir, big_dir = os.path.join(base, "small"), os.path.join(base, "big")
        os.makedirs(small_dir, exist_ok=True)
        os.makedirs(big_dir, exist_ok=True)
        small = spawn("ours", args.small, small_dir)
        print(f"{args.small:,}: {json.dumps(small)}", file=sys.stderr)
        big = spawn("ours", args.n, big_dir)
        print(f"{args.n:,}: {json.dumps(big)}", file=sys.stderr)
        naive = spawn("naive", args.n, big_dir)
        print(f"naive {args.n:,}: {json.dumps(naive)}", file=sys.stderr)
        ours_s = big["split_s"] + big["merge_s"]
        naive_s = naive["naive_split_s"] + naive["naive_merge_s"]
        print(json.dumps({
            "n": args.n, "input_mb": round(big["input_mb"], 1), "output_mb": round(big["output_mb"], 1),
            "shards": big["shards"], "build_s": round(big["build_s"], 2),
            "split_mb_s": round(big["split_mb_s"], 1), "merge_mb_s": round(big["merge_mb_s"], 1),
            "split_mb_s_cpu": round(big["split_mb_s_cpu"], 1), "merge_mb_s_cpu": round(big["merge_mb_s_cpu"], 1),
            "peak_rss_mb": round(big["peak_rss_mb"], 1), "peak_rss_mb_100k": round(small["peak_rss_mb"], 1),
            "rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "naive_split_s": round(naive["naive_split_s"], 2), "naive_merge_s": round(naive["naive_merge_s"], 2),
            "naive_peak_rss_mb": round(naive["naive_peak_rss_mb"], 1),
            "speedup_vs_naive": round(naive_s / ours_s, 2),
            "split_speedup_vs_naive": round(naive["naive_split_s"] / big["split_s"], 2),
            "merge_speedup_vs_naive": round(naive["naive_merge_s"] / big["merge_s"], 2),
        }))
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
