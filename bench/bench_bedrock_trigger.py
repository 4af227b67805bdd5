"""Benchmark: one BedrockJobTrigger waiting for N Bedrock batch jobs, on the amazon provider's aiobotocore client.

The jobs run on the local Bedrock stand-in (airflow_provider_synth.server.bedrock) over moto's S3 server, both
on 127.0.0.1; each job takes ``--step-s`` per status (Submitted, Validating, Scheduled, InProgress), then
answers its records. A 10 ms heartbeat on the trigger's event loop records the worst lag; the baseline is the
same heartbeat on an idle loop, measured in the same run. The sync alternative (boto3's client called inside
``run()``, what a blocking trigger does) is measured too, over the same jobs.

    .venv/bin/python bench/bench_bedrock_trigger.py --n 50

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from typing import Any


async def _heartbeat(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - start - 0.01)


async def _measure(work: Any) -> tuple[float, float]:
    stop, lags = asyncio.Event(), [0.0]
    beat = asyncio.create_task(_heartbeat(stop, lags))
    start = time.perf_counter()
    await work()
    wall = time.perf_counter() - start
    stop.set()
    await beat
    return wall, max(lags)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--step-s", type=float, default=0.5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    s3_url = f"http://{host}:{port}"
    from airflow_provider_synth.server.bedrock import BedrockStandIn

    srv = BedrockStandIn(s3_url, step_s=args.step_s, min_records=1).start()
    os.environ["AIRFLOW_CONN_AWS_BENCH"] = json.dumps({
        "conn_type": "aws", "login": "bench", "password": "bench",
        "extra": {"region_name": "us-east-1", "endpoint_url": s3_url,
                  "service_config": {"bedrock": {"endpoint_url": srv.endpoint_url}}}})
    import boto3

    from airflow_provider_synth.hooks.bedrock import BedrockBatchHook, job_state
    from airflow_provider_synth.triggers.bedrock import BedrockJobTrigger

    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="b",
                      aws_secret_access_key="b")
    s3.create_bucket(Bucket="bench-bedrock")
    hook = BedrockBatchHook(aws_conn_id="aws_bench")

    def jobs(tag: str) -> list[str]:
        arns = []
        for i in range(args.n):
            key = f"{tag}/{i}/records.jsonl"
            s3.put_object(Bucket="bench-bedrock", Key=key, Body=json.dumps(
                {"recordId": "R0000000000", "modelInput": {"prompt": f"q {i}", "max_gen_len": 4}}).encode())
            arns.append(hook.create_job(job_name=f"{tag}-{i}", role_arn="arn:aws:iam::123456789012:role/bench",
                                        model_id="meta.llama3-1-8b-instruct-v1:0",
                                        input_uri=f"s3://bench-bedrock/{key}",
                                        output_uri=f"s3://bench-bedrock/{tag}/{i}/out/",
                                        client_request_token=f"{tag}{i}"))
        return arns

    async def idle() -> None:
        await asyncio.sleep(3)

    ours_arns = jobs("ours")

    async def ours() -> None:
        trigger = BedrockJobTrigger("aws_bench", ours_arns, poll_interval=0.5)
        events = [e.payload async for e in trigger.run()]
        assert len(events) == 1 and events[0]["status"] == "success", events

    sync_arns = jobs("sync")

    async def blocking() -> None:  # what a trigger calling the sync client in run() does to the loop
        while True:
            states = [job_state(hook.get_job(a))["status"] for a in sync_arns]
            if all(s in ("Completed", "PartiallyCompleted") for s in states):
                return
            await asyncio.sleep(0.5)

    base_wall, base_lag = asyncio.run(_measure(idle))
    ours_wall, ours_lag = asyncio.run(_measure(ours))
    sync_wall, sync_lag = asyncio.run(_measure(blocking))
    srv.close()
    moto.stop()
    print(json.dumps({"n_jobs": args.n, "step_s": args.step_s, "baseline_lag_max_s": round(base_lag, 4),
                      "ours_wall_s": round(ours_wall, 2), "ours_lag_max_s": round(ours_lag, 4),
                      "sync_wall_s": round(sync_wall, 2), "sync_lag_max_s": round(sync_lag, 4),
                      "get_requests": srv.counters["get_requests"]}))


if __name__ == "__main__":
    main()
