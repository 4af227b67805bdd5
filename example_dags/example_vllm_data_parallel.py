"""Data parallelism with vLLM: split one big request file into shards, answer each shard on its own GPU worker
(or pod), then merge the shards' output folders into one.

Each mapped ``synthesize`` task is an ordinary :class:`VLLMBatchOperator` with its own output folder and resume
state, so a lost node retries one shard, not the run. On the KubernetesExecutor every shard runs in a pod that
asks for one ``nvidia.com/gpu``; on the CeleryExecutor it goes to the ``gpu`` queue. Environment as in
``example_vllm_batch.py``, plus ``SYNTH_VLLM_SHARD_SIZE`` (requests per shard).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.configuration import conf
from airflow.sdk import dag, task

from airflow_provider_synth.operators.vllm import (
    VLLMBatchOperator,
    VLLMEngineConfig,
    gpu_pod_override,
    merge_output_folders,
)

MODEL = os.environ.get("SYNTH_VLLM_MODEL", "Qwen/Qwen2.5-1.5B-Instruct")
VLLM_PYTHON = os.environ.get("SYNTH_VLLM_PYTHON", "/opt/vllm/bin/python")
OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
SHARD_SIZE = int(os.environ.get("SYNTH_VLLM_SHARD_SIZE", "50000"))


# [START howto_operator_vllm_kubernetes]
def gpu_placement() -> dict[str, Any]:
    """Where each shard runs: a pod with one GPU on the KubernetesExecutor, else the Celery ``gpu`` queue."""
    if "KubernetesExecutor" in conf.get("core", "executor", fallback=""):
        return {"executor_config": gpu_pod_override(gpus=1, memory="48Gi")}
    return {"queue": "gpu"}
# [END howto_operator_vllm_kubernetes]


@dag(schedule=None, catchup=False, tags=["synth", "vllm", "example"], params={"n_records": 1000})
def example_vllm_data_parallel() -> None:
    @task
    def split(params: dict[str, Any] | None = None, run_id: str | None = None) -> list[dict[str, str]]:
        """Write the requests, split them into shards with the core; one mapped task per shard."""
        from airflow_provider_synth.batch.paths import open_path
        from airflow_provider_synth.batch.requests import build_requests
        from airflow_provider_synth.batch.split import ShardLimits, split_requests

        base = f"{OUTPUT_DIR}/example_vllm_data_parallel/{run_id}"
        n = int((params or {}).get("n_records", 1000))
        records = ({"id": f"fact-{i:06d}", "n": i} for i in range(n))
        requests = build_requests(records, model=MODEL, id_field="id", prompt_template="Tell me a fact about {n}.",
                                  params={"max_tokens": 32})
        result = split_requests(requests, lambda i: open_path(f"{base}/shards/shard-{i:04d}.jsonl", "wb"),
                                limits=ShardLimits(max_requests=SHARD_SIZE))
        return [{"input_path": f"{base}/shards/shard-{s.index:04d}.jsonl",
                 "output_path": f"{base}/shard-outputs/shard-{s.index:04d}"} for s in result.shards]

    # [START howto_operator_vllm_data_parallel]
    synthesize = VLLMBatchOperator.partial(
        task_id="synthesize",
        model=MODEL,
        python=VLLM_PYTHON,
        engine=VLLMEngineConfig(dtype="bfloat16", max_model_len=4096),
        max_failed_ratio=0.01,
        retries=2,
        **gpu_placement(),
    ).expand_kwargs(split())

    @task
    def merge(manifests: list[dict[str, Any]], run_id: str | None = None) -> dict[str, Any]:
        """One output folder for the whole run, shards in input order."""
        folders = [m["output_dir"] for m in manifests]
        return merge_output_folders(folders, f"{OUTPUT_DIR}/example_vllm_data_parallel/{run_id}/merged",
                                    run_id=run_id)

    merge(synthesize.output)
    # [END howto_operator_vllm_data_parallel]


example_vllm_data_parallel()
