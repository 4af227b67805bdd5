"""What the output checks cost the merge: the same shard merged with no checks, with a finish-reason check, and
with a pydantic schema (structured output, ``parsed`` written into each result).

    .venv/bin/python bench/bench_checks.py [--n 100000]

The last line printed is one JSON object with the figures (MB of output per CPU second).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import orjson
from pydantic import BaseModel


class Quiz(BaseModel):
    question: str
    answer: str
    level: int


def write_files(folder: str, n: int) -> tuple[str, str]:
    req_path, out_path = os.path.join(folder, "requests.jsonl"), os.path.join(folder, "output.jsonl")
    with open(req_path, "wb") as rf, open(out_path, "wb") as of:
        for i in range(n):
            cid = f"rec-{i:08d}"
            rf.write(orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q"}]}})
                     + b"\n")
            content = orjson.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i), "level": i % 5}).decode()
            finish = "length" if i % 100 == 0 else "stop"
            body = {"id": f"chatcmpl-{i}", "object": "chat.completion", "model": "gpt-4o-mini",
                    "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                                 "message": {"role": "assistant", "content": content, "refusal": None}}],
                    "usage": {"prompt_tokens": 20, "completion_tokens": 15, "total_tokens": 35}}
            of.write(orjson.dumps({"id": f"batch_req_{i}", "custom_id": cid, "response": {
                "status_code": 200, "request_id": f"req_{i}", "body": body}, "error": None}) + b"\n")
    return req_path, out_path


def merge_cpu_s(req_path: str, out_path: str, folder: str, checks: object) -> float:
    from airflow_provider_synth.batch import ShardOutputs, merge_shards

    c0 = time.process_time()
    with open(os.path.join(folder, "results.jsonl"), "wb") as rf, open(os.path.join(folder, "f.jsonl"), "wb") as ff:
        merge_shards([ShardOutputs(req_path, [out_path])], rf, ff, checks)  # type: ignore[arg-type]
    return time.process_time() - c0


def main() -> None:
    from airflow_provider_synth.batch.checks import OutputChecks

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        req_path, out_path = write_files(folder, args.n)
        mb = os.path.getsize(out_path) / 1e6
        figures: dict[str, float] = {"n": args.n, "output_mb": round(mb, 1)}
        for name, checks in (("none", None), ("finish_reason", OutputChecks(finish_reasons={"length"})),
                             ("pydantic", OutputChecks(finish_reasons={"length"}, schema=Quiz))):
            best = min(merge_cpu_s(req_path, out_path, folder, checks) for _ in range(3))
            figures[f"merge_mb_s_cpu_{name}"] = round(mb / best, 1)
            print(f"{name}: {mb / best:.1f} MB/s per CPU second")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
