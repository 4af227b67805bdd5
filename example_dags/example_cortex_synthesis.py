"""Synthesize data with Snowflake Cortex: records -> OpenAI-format chat JSONL -> AI_COMPLETE in the warehouse.

The requests are the same JSONL the OpenAI backend takes; the answers land in ``results.jsonl``,
``failures.jsonl`` and ``manifest.json`` under the output folder. Set ``SYNTH_OUTPUT_DIR`` to an object
storage URL (``s3://bucket/synth``) in production; it defaults to a local folder.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.batch.paths import join_path, open_path
from airflow_provider_synth.batch.requests import build_requests, write_requests
from airflow_provider_synth.operators.cortex import CortexBatchOperator, CortexConfig

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
PRODUCTS = ["hiking boots", "espresso machine", "noise-cancelling headphones", "standing desk", "rain jacket",
            "cast-iron pan", "e-reader", "yoga mat"]


@dag(schedule=None, catchup=False, tags=["synth", "cortex", "example"])
def example_cortex_synthesis() -> None:
    @task
    def build_prompts(run_id: str | None = None) -> str:
        """Turn records into chat requests (deterministic custom_ids) and write them as JSONL."""
        records = [{"sku": f"SKU-{i:04d}", "product": name} for i, name in enumerate(PRODUCTS)]
        path = join_path(join_path(OUTPUT_DIR, str(run_id)), "requests.jsonl")
        requests = build_requests(
            records, endpoint="/v1/chat/completions", model="llama3.1-8b", id_field="sku",
            prompt_template="Write a two-sentence product description for a {product}.",
            params={"temperature": 0.3, "max_tokens": 200},
        )
        with open_path(path, "wb") as fp:
            write_requests(requests, fp)
        return str(path)

    # [START howto_operator_cortex]
    synthesize = CortexBatchOperator(
        task_id="synthesize",
        input_path="{{ ti.xcom_pull(task_ids='build_prompts') }}",
        output_path=OUTPUT_DIR + "/{{ run_id }}/cortex",
        model="llama3.1-8b",
        conn_id="snowflake_default",
        config=CortexConfig(chunk_size=4),  # rows per AI_COMPLETE statement; thousands in real runs
        max_failed_ratio=0.2,
        retries=2,  # a retry answers only the rows still missing: nothing is paid twice
        retry_delay=timedelta(seconds=5),
    )
    # [END howto_operator_cortex]

    @task
    def report(manifest: dict[str, Any]) -> None:
        print(f"{manifest['succeeded']} of {manifest['total']} answered; results in {manifest['results_path']}")

    build_prompts() >> synthesize
    report(synthesize.output)


example_cortex_synthesis()
