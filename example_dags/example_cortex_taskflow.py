"""Snowflake Cortex in TaskFlow form: ``@task.synth_cortex_batch``.

The decorated function returns records (or chat request lines); the decorator builds the requests with
``model`` and ``template``, writes them to ``<output_path>/_work/requests.jsonl``, answers them with
``AI_COMPLETE`` in the warehouse, and returns the manifest.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.operators.openai_batch import RequestTemplate

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
PRODUCTS = ["hiking boots", "espresso machine", "noise-cancelling headphones", "standing desk", "rain jacket",
            "cast-iron pan", "e-reader", "yoga mat"]


@dag(schedule=None, catchup=False, tags=["synth", "cortex", "taskflow", "example"])
def example_cortex_taskflow() -> None:
    # [START howto_decorator_cortex]
    @task.synth_cortex_batch(
        model="llama3.1-8b",
        template=RequestTemplate(prompt_template="Write a two-sentence product description for a {product}.",
                                 id_field="sku", params={"temperature": 0.3, "max_tokens": 200}),
        output_path=OUTPUT_DIR + "/{{ run_id }}/cortex",
        snowflake_conn_id="snowflake_default",
        chunk_size=4,  # rows per AI_COMPLETE statement; thousands in real runs
        max_failed_ratio=0.2,
    )
    def describe() -> list[dict[str, Any]]:
        return [{"sku": f"SKU-{i:04d}", "product": name} for i, name in enumerate(PRODUCTS)]

    @task
    def report(manifest: dict[str, Any]) -> None:
        print(f"{manifest['succeeded']} of {manifest['total']} answered; results in {manifest['results_path']}")

    report(describe())
    # [END howto_decorator_cortex]


example_cortex_taskflow()
