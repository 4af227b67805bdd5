"""Claude through the Message Batches API: records -> structured answers -> checked, typed rows.

``@task.synth_anthropic_batch`` builds one request per product record (the same OpenAI-style template every
backend takes), translates it to Claude's Messages params, and submits the batches (half the direct price). The
answers must fit ``ProductCopy``: the output checks send cut-off answers (``stop_reason: "max_tokens"``), refusals
and off-schema JSON to ``failures.jsonl`` and retry them alone (a cut-off one with a larger ``max_tokens``);
``results.jsonl`` holds only validated rows, in input order, under the records' own ids.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.sdk import dag, task
from pydantic import BaseModel, Field

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.requests import RequestTemplate

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
PRODUCTS = ["tea kettle", "desk lamp", "hiking boots", "chess set", "rain jacket", "bread knife"]


class ProductCopy(BaseModel):
    """Marketing copy for one product, as Claude must answer it."""

    headline: str = Field(description="at most eight words")
    description: str = Field(description="two sentences")
    tags: list[str] = Field(description="three lowercase tags")


@dag(schedule=None, catchup=False, tags=["synth", "anthropic", "example"], params={"n_records": 60})
def example_anthropic_batch() -> None:
    # [START howto_decorator_anthropic_batch]
    @task.synth_anthropic_batch(
        conn_id="anthropic_default",
        model="claude-haiku-4-5",
        template=RequestTemplate(
            system="You write product copy as JSON.",
            prompt_template="Write copy for a {product} (catalogue item {sku}).",
            id_field="sku",  # any string: ids Anthropic would refuse are mapped, and given back in the output
            params={"max_tokens": 400},
            response_format=ProductCopy,  # Claude's structured output; the checks validate against it
        ),
        checks=OutputChecks(finish_reasons={"length"}, refusal=True,
                            retry_body={"truncated": {"max_tokens": 1200}}),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}",
        retry_failed_requests=2,
        max_cost_usd=5.0,
        max_failed_ratio=0.05,
        poll_interval=60,
        deferrable=True,
    )
    def write_copy(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        n = int((params or {}).get("n_records", 60))
        return [{"sku": f"SKU {i:05d}", "product": PRODUCTS[i % len(PRODUCTS)]} for i in range(n)]

    # [END howto_decorator_anthropic_batch]

    @task
    def typed_rows(manifest: dict[str, Any]) -> int:
        from airflow_provider_synth.batch.extract import iter_parsed

        rows = [(sku, copy) for sku, copy in iter_parsed(manifest["results_path"], ProductCopy)]
        print(f"{len(rows)} validated rows (first: {rows[0][0]}: {rows[0][1].headline!r}); "
              f"{manifest['failed']} failed; cost ${manifest['cost_usd']} (estimate ${manifest['est_cost_usd']})")
        return len(rows)

    typed_rows(write_copy())


example_anthropic_batch()
