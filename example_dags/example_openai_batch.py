"""Synthesize quiz data with the OpenAI Batch API: records in, every answer in object storage, no worker held.

The task validates and splits the requests, submits every shard, waits deferred in the triggerer, retries
only the requests a retry can fix, and merges everything into ``results.jsonl``, ``failures.jsonl`` and
``manifest.json`` under the output folder. Set ``SYNTH_OUTPUT_DIR`` to an object storage URL
(``s3://bucket/synth``) in production; it defaults to a local folder. The connection ``synth_openai_default``
holds the API key (or points at ``python -m airflow_provider_synth.server`` for an offline run).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.operators.openai_batch import (
    OpenAIBatchOperator,
    RequestTemplate,
)

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
TOPICS = ["astronomy", "baking", "chess", "databases", "ecology", "finance", "geology", "history",
          "immunology", "jazz"]


@dag(schedule=None, catchup=False, tags=["synth", "openai", "example"], params={"n_records": 1000})
def example_openai_batch() -> None:
    @task
    def make_records(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Seed records; in real DAGs, rows from a table or a file (pass a JSONL path for millions)."""
        n = int((params or {}).get("n_records", 1000))
        return [{"id": f"quiz-{i:06d}", "topic": TOPICS[i % len(TOPICS)], "level": 1 + i % 5} for i in range(n)]

    # [START howto_operator_openai_batch]
    synthesize = OpenAIBatchOperator(
        task_id="synthesize",
        conn_id="synth_openai_default",
        requests=make_records(),
        model="gpt-4o-mini",
        template=RequestTemplate(
            system="You write short, factual quiz questions.",
            prompt_template="Write one {topic} question at difficulty {level} of 5, then its answer.",
            id_field="id",
            params={"temperature": 0.7, "max_completion_tokens": 200},
        ),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}",
        max_failed_ratio=0.01,     # accept up to 1% failed requests (listed in failures.jsonl)
        retry_failed_requests=2,   # resubmit 429/5xx/expired requests, never finished ones
        max_cost_usd=50.0,         # refuse to submit a run estimated above this
        deferrable=True,           # wait in the triggerer, not in a worker slot
    )
    # [END howto_operator_openai_batch]

    @task
    def report(manifest: dict[str, Any]) -> None:
        print(f"{manifest['succeeded']} of {manifest['total']} answered in {len(manifest['batch_ids'])} "
              f"batch(es); cost ${manifest['cost_usd']}; results in {manifest['results_path']}")

    report(synthesize.output)


example_openai_batch()
