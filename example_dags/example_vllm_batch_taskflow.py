"""vLLM in TaskFlow form: ``@task.synth_vllm_batch``, one engine run per shard with ``.expand``.

The decorated function returns records (or request lines); the decorator builds the requests for ``model``
with ``template``, writes them to ``<output_path>/_work/requests.jsonl``, runs them through the vLLM engine
on a GPU worker, and returns the manifest. Environment: ``SYNTH_VLLM_MODEL``, ``SYNTH_VLLM_PYTHON``,
``SYNTH_OUTPUT_DIR`` (see example_vllm_batch.py).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.operators.openai_batch import RequestTemplate
from airflow_provider_synth.operators.vllm import VLLMEngineConfig

MODEL = os.environ.get("SYNTH_VLLM_MODEL", "Qwen/Qwen2.5-1.5B-Instruct")
VLLM_PYTHON = os.environ.get("SYNTH_VLLM_PYTHON", "/opt/vllm/bin/python")
OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
PRODUCTS = ["umbrella", "kettle", "backpack", "desk lamp", "water bottle", "notebook", "headphones", "scarf"]


@dag(schedule=None, catchup=False, tags=["synth", "vllm", "taskflow", "example"],
     params={"colours": ["red", "navy"], "per_colour": 40})
def example_vllm_batch_taskflow() -> None:
    @task
    def colours(params: dict[str, Any] | None = None) -> list[str]:
        return list((params or {}).get("colours", ["red"]))

    # [START howto_decorator_vllm]
    @task.synth_vllm_batch(
        model=MODEL,
        template=RequestTemplate(system="You write one-sentence product descriptions.",
                                 prompt_template="Describe a {colour} {product}.", id_field="id",
                                 params={"max_tokens": 48}),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}/{{ ti.map_index }}",
        engine=VLLMEngineConfig(dtype="bfloat16", max_model_len=4096),
        python=VLLM_PYTHON,
        queue="gpu",  # CeleryExecutor: the GPU workers' queue
    )
    def describe(colour: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        n = int((params or {}).get("per_colour", 40))
        return [{"id": f"{colour}-{i:04d}", "colour": colour, "product": PRODUCTS[i % len(PRODUCTS)]}
                for i in range(n)]

    manifests = describe.expand(colour=colours())
    # [END howto_decorator_vllm]

    @task
    def report(manifests: list[dict[str, Any]]) -> int:
        answered = sum(m["succeeded"] for m in manifests)
        print(f"{answered} descriptions from {len(manifests)} engine run(s)")
        return answered

    report(manifests)


example_vllm_batch_taskflow()
