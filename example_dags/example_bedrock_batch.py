"""Synthesize data with Amazon Bedrock batch inference: OpenAI-format JSONL -> Bedrock jobs -> every answer landed.

The requests are the same JSONL every backend takes; ``BedrockBatchOperator`` translates each line into the
model's native body (here Claude's), stages the records in S3 through the ``aws_default`` connection, runs them
as batch inference jobs (half the on-demand price), and lands ``results.jsonl``, ``failures.jsonl`` and
``manifest.json`` in the output folder. ``@task.synth_bedrock_batch`` does the same from records a function
returns (here Titan text embeddings).

Set ``SYNTH_BEDROCK_ROLE_ARN`` (the service role Bedrock assumes to read and write the staging prefix),
``SYNTH_BEDROCK_STAGING`` (``s3://bucket/prefix``) and ``SYNTH_OUTPUT_DIR`` (an object storage URL in
production). A Bedrock job takes at least 100 records: this example builds 100.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.batch.paths import join_path, open_path
from airflow_provider_synth.batch.requests import build_requests, write_requests
from airflow_provider_synth.decorators.bedrock import synth_bedrock_batch_task
from airflow_provider_synth.operators.bedrock import BedrockBatchConfig, BedrockBatchOperator

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
ROLE_ARN = os.environ.get("SYNTH_BEDROCK_ROLE_ARN", "arn:aws:iam::123456789012:role/synth-bedrock-batch")
STAGING = os.environ.get("SYNTH_BEDROCK_STAGING", "s3://my-bedrock-batch-bucket/synth")
POLL_S = float(os.environ.get("SYNTH_BEDROCK_POLL_S", "60"))
PRODUCTS = [f"product {i}" for i in range(100)]


@dag(schedule=None, catchup=False, tags=["synth", "bedrock", "example"])
def example_bedrock_batch() -> None:
    @task
    def build_prompts(run_id: str | None = None) -> str:
        """Turn records into chat requests (deterministic custom_ids) and write them as JSONL."""
        records = [{"sku": f"SKU-{i:04d}", "product": name} for i, name in enumerate(PRODUCTS)]
        path = join_path(join_path(OUTPUT_DIR, str(run_id)), "requests.jsonl")
        requests = build_requests(
            records, endpoint="/v1/chat/completions", model="claude-3-5-haiku", id_field="sku",
            prompt_template="Write a two-sentence product description for a {product}.",
            params={"temperature": 0.3, "max_tokens": 200},
        )
        with open_path(path, "wb") as fp:
            write_requests(requests, fp)
        return str(path)

    # [START howto_operator_bedrock]
    synthesize = BedrockBatchOperator(
        task_id="synthesize",
        input_path="{{ ti.xcom_pull(task_ids='build_prompts') }}",
        output_path=OUTPUT_DIR + "/{{ run_id }}/bedrock",
        model="us.anthropic.claude-3-5-haiku-20241022-v1:0",
        conn_id="aws_default",
        poll_interval=POLL_S,
        max_failed_ratio=0.05,
        retry_failed_requests=2,  # records a retry can fix (throttled, 5xx, expired) run again, alone
        max_cost_usd=5.0,  # refuse, before anything is staged, a run estimated above this
        config=BedrockBatchConfig(role_arn=ROLE_ARN, staging_prefix=STAGING, pad_to_minimum=True),
        retries=2,  # a retry re-attaches to its jobs (clientRequestToken): nothing is paid twice
        retry_delay=timedelta(seconds=5),
    )
    # [END howto_operator_bedrock]

    # [START howto_decorator_bedrock]
    @synth_bedrock_batch_task(
        output_path=OUTPUT_DIR + "/{{ run_id }}/embeddings",
        model="amazon.titan-embed-text-v2:0",
        poll_interval=POLL_S,
        config=BedrockBatchConfig(role_arn=ROLE_ARN, staging_prefix=STAGING, endpoint="/v1/embeddings"),
    )
    def embed() -> list[dict[str, Any]]:
        return [{"custom_id": f"emb-{i:04d}", "method": "POST", "url": "/v1/embeddings",
                 "body": {"model": "amazon.titan-embed-text-v2:0", "input": name, "dimensions": 256}}
                for i, name in enumerate(PRODUCTS)]
    # [END howto_decorator_bedrock]

    @task
    def report(answers: dict[str, Any], vectors: dict[str, Any]) -> None:
        for manifest in (answers, vectors):
            print(f"{manifest['succeeded']} of {manifest['total']} answered (${manifest['cost_usd']}); "
                  f"results in {manifest['results_path']}")

    build_prompts() >> synthesize
    report(synthesize.output, embed())


example_bedrock_batch()
