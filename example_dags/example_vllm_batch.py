"""Synthesize product descriptions with a vLLM engine on your own GPU workers: no API, no per-token bill.

``make_requests`` writes the OpenAI-format request JSONL with the core; ``synthesize`` runs it through vLLM on a
GPU worker (the Celery ``gpu`` queue) and writes ``results.jsonl``, ``failures.jsonl`` and ``manifest.json``
under the output folder. A retry (node lost, task killed) resumes where the engine stopped.

Environment (read when the DAG is parsed): ``SYNTH_VLLM_MODEL`` (a model path or id the GPU workers can load),
``SYNTH_VLLM_PYTHON`` (the vLLM interpreter, see ``scripts/install_vllm.sh``), ``SYNTH_OUTPUT_DIR`` (an object
storage URL such as ``s3://bucket/synth`` in production; a local folder by default).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.operators.vllm import VLLMBatchOperator, VLLMConfig, VLLMEngineConfig

MODEL = os.environ.get("SYNTH_VLLM_MODEL", "Qwen/Qwen2.5-1.5B-Instruct")
VLLM_PYTHON = os.environ.get("SYNTH_VLLM_PYTHON", "/opt/vllm/bin/python")
OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
PRODUCTS = ["umbrella", "kettle", "backpack", "desk lamp", "water bottle", "notebook", "headphones", "scarf"]
COLOURS = ["red", "green", "navy", "yellow", "black"]


@dag(schedule=None, catchup=False, tags=["synth", "vllm", "example"], params={"n_records": 300})
def example_vllm_batch() -> None:
    @task
    def make_requests(params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        """Records -> request JSONL in the output folder (shared storage: the GPU worker reads it)."""
        from airflow_provider_synth.batch.paths import open_path
        from airflow_provider_synth.batch.requests import build_requests, write_requests

        n = int((params or {}).get("n_records", 300))
        records = [{"id": f"product-{i:05d}", "product": PRODUCTS[i % len(PRODUCTS)],
                    "colour": COLOURS[i % len(COLOURS)]} for i in range(n)]
        path = f"{OUTPUT_DIR}/example_vllm_batch/{run_id}/requests.jsonl"
        with open_path(path, "wb") as fp:
            write_requests(build_requests(
                records, model=MODEL, id_field="id",
                system="You write one-sentence product descriptions.",
                prompt_template="Describe a {colour} {product}.",
                params={"max_tokens": 48, "temperature": 0.8},
            ), fp)
        return path

    # [START howto_operator_vllm]
    synthesize = VLLMBatchOperator(
        task_id="synthesize",
        input_path=make_requests(),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}/out",
        model=MODEL,
        engine=VLLMEngineConfig(dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.9),
        sampling={"temperature": 0.7, "max_tokens": 256},  # each request's body overrides these
        python=VLLM_PYTHON,         # the interpreter with vLLM (it cannot share Airflow's environment)
        config=VLLMConfig(chunk_size=1024),  # requests per engine call; a kill loses at most one chunk
        max_failed_ratio=0.01,      # bad requests become failures.jsonl lines; fail the task above 1%
        queue="gpu",                # CeleryExecutor: only `airflow celery worker --queues gpu` runs it
        retries=2,                  # a retry resumes from the answers already saved
    )
    # [END howto_operator_vllm]

    @task
    def report(manifest: dict[str, Any]) -> None:
        usage = manifest["usage"]
        print(f"{manifest['succeeded']} of {manifest['total']} answered on vLLM in {manifest['elapsed_s']} s "
              f"({usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens); "
              f"results in {manifest['results_path']}")

    report(synthesize.output)


example_vllm_batch()
