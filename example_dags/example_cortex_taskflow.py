"""Snowflake Cortex in TaskFlow form: ``@task.synth_cortex_batch``.

The decorated function returns records (or chat request lines); the decorator builds the requests with
``model`` and ``template``, writes them to ``<output_path>/_work/requests.jsonl``, answers them with
``AI_COMPLETE`` in the warehouse, and returns the manifest.

``example_cortex_taskflow_mapped`` maps the decorated task over product categories with ``.expand``: each
mapped task instance runs its own Cortex run (its own staging tables and statements) in its own output folder
(``{{ ti.map_index }}`` in ``output_path``).
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.batch.requests import RequestTemplate
from airflow_provider_synth.operators.cortex import CortexConfig

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
        conn_id="snowflake_default",
        config=CortexConfig(chunk_size=4),  # rows per AI_COMPLETE statement; thousands in real runs
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

CATALOGUE = {
    "outdoor": ["hiking boots", "rain jacket", "tent", "head torch"],
    "kitchen": ["espresso machine", "cast-iron pan", "chef's knife", "kettle"],
    "office": ["standing desk", "e-reader", "noise-cancelling headphones", "desk lamp"],
}


@dag(schedule=None, catchup=False, tags=["synth", "cortex", "taskflow", "example"],
     params={"categories": list(CATALOGUE)})
def example_cortex_taskflow_mapped() -> None:
    @task
    def categories(params: dict[str, Any] | None = None) -> list[str]:
        return list((params or {}).get("categories", CATALOGUE))

    # [START howto_decorator_cortex_mapped]
    @task.synth_cortex_batch(
        model="llama3.1-8b",
        template=RequestTemplate(prompt_template="Write a two-sentence product description for a {product}.",
                                 id_field="sku", params={"temperature": 0.3, "max_tokens": 200}),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}/{{ ti.map_index }}",
        conn_id="snowflake_default",
        config=CortexConfig(chunk_size=2),
        max_failed_ratio=0.25,
        retries=1,  # only this map index retries, and it answers only its rows still missing
        retry_delay=timedelta(seconds=5),
    )
    def describe_category(category: str) -> list[dict[str, Any]]:
        """The products of one category; one Cortex run answers them."""
        return [{"sku": f"{category}-{i:02d}", "product": name} for i, name in enumerate(CATALOGUE[category])]

    manifests = describe_category.expand(category=categories())
    # [END howto_decorator_cortex_mapped]

    @task
    def report(manifests: list[dict[str, Any]]) -> dict[str, Any]:
        total = {k: sum(m[k] for m in manifests) for k in ("total", "succeeded", "failed")}
        print(f"{total['succeeded']} of {total['total']} answered over {len(manifests)} categories")
        return {**total, "runs": len(manifests)}

    report(manifests)


example_cortex_taskflow_mapped()
