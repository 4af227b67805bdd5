"""Submit now, collect later: the Batch API's save/upload/submit, then retrieve/download, as Airflow tasks.

``submit`` validates, splits, uploads and submits, then returns its manifest at once (no wait). The
deferrable sensor waits for the batches in the triggerer; ``collect`` downloads, runs retry rounds for what
a retry can fix, merges into ``results.jsonl``/``failures.jsonl``/``manifest.json``, and applies
``max_failed_ratio``. Use this shape when another team's DAG, a human approval or a long window sits
between submission and collection.
"""

from __future__ import annotations

import os
import tempfile

from airflow.sdk import dag

from airflow_provider_synth.operators.openai_batch import (
    OpenAIBatchConfig,
    OpenAIBatchOperator,
    OpenAIBatchResultsOperator,
    RequestTemplate,
)
from airflow_provider_synth.sensors.openai_batch import OpenAIBatchSensor

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
PRODUCTS = [{"sku": f"SKU-{i:04d}", "product": p} for i, p in enumerate(
    ["hiking boots", "espresso machine", "standing desk", "rain jacket", "cast-iron pan", "e-reader"] * 10)]


@dag(schedule=None, catchup=False, tags=["synth", "openai", "example"])
def example_openai_batch_submit_collect() -> None:
    # [START howto_operator_openai_batch_submit_collect]
    submit = OpenAIBatchOperator(
        task_id="submit",
        conn_id="synth_openai_default",
        requests=PRODUCTS,
        model="gpt-4o-mini",
        template=RequestTemplate(prompt_template="Write a two-sentence description of a {product}.",
                                 id_field="sku"),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}",
        config=OpenAIBatchConfig(wait_for_completion=False),  # return the manifest as soon as the batches exist
    )
    wait = OpenAIBatchSensor(
        task_id="wait",
        conn_id="synth_openai_default",
        batch_ids=submit.output,      # the manifest's batch_ids
        deferrable=True,
    )
    collect = OpenAIBatchResultsOperator(
        task_id="collect",
        submitted=submit.output,      # downloads, retries what a retry can fix, merges
        max_failed_ratio=0.0,
        deferrable=True,
    )
    submit >> wait >> collect
    # [END howto_operator_openai_batch_submit_collect]


example_openai_batch_submit_collect()
