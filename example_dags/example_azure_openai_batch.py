"""Synthesize with an Azure OpenAI Global-Batch deployment: the same operator, on an Azure connection.

The ``synth_azure_openai`` connection holds the resource endpoint (host), the ``api_version`` extra, and
either an API key (password) or nothing, in which case the hook gets a Microsoft Entra ID token from
``azure-identity`` (service principal extras, managed identity, or a custom ``azure_ad_token_provider``).
On Azure the request's ``model`` is the **deployment** name, and prices follow your contract: give them in
``prices=`` so ``max_cost_usd`` and the manifest's ``cost_usd`` can be computed.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.operators.openai_batch import (
    OpenAIBatchConfig,
    OpenAIBatchOperator,
    RequestTemplate,
)

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
# None: the operator's default (60 s against a service, 2 s against a server on this machine)
POLL_INTERVAL = float(os.environ["SYNTH_POLL_INTERVAL"]) if os.environ.get("SYNTH_POLL_INTERVAL") else None
#: the name of a deployment of type "Global-Batch" in your Azure OpenAI resource
AZURE_DEPLOYMENT = os.environ.get("SYNTH_AZURE_DEPLOYMENT", "gpt-4o-mini-batch")
PRODUCTS = ["trail shoes", "espresso grinder", "noise-cancelling headphones", "standing desk", "rain jacket",
            "e-reader", "cast-iron pan", "mechanical keyboard", "camping stove", "smart thermostat"]
TONES = ["delighted", "disappointed", "mixed", "sarcastic"]


@dag(schedule=None, catchup=False, tags=["synth", "azure", "example"], params={"n_records": 200})
def example_azure_openai_batch() -> None:
    @task
    def make_records(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Seeds for synthetic product reviews: every product in every tone, repeated."""
        n = int((params or {}).get("n_records", 200))
        return [{"id": f"review-{i:05d}", "product": PRODUCTS[i % len(PRODUCTS)],
                 "tone": TONES[(i // len(PRODUCTS)) % len(TONES)]} for i in range(n)]

    # [START howto_operator_azure_openai_batch]
    synthesize = OpenAIBatchOperator(
        task_id="synthesize",
        conn_id="synth_azure_openai_default",   # a synth_azure_openai connection: the client is AzureOpenAI
        requests=make_records(),
        model=AZURE_DEPLOYMENT,                  # on Azure: the Global-Batch deployment's name
        template=RequestTemplate(
            system="You write realistic customer reviews.",
            prompt_template="Write a {tone} three-sentence review of {product}.",
            id_field="id",
            params={"temperature": 0.8, "max_completion_tokens": 150},
        ),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}",
        poll_interval=POLL_INTERVAL,
        # USD per 1M tokens (input, cached input, output) at the direct price; the batch discount is applied
        max_cost_usd=10.0,
        config=OpenAIBatchConfig(prices={AZURE_DEPLOYMENT: (0.15, 0.075, 0.60)}),
        max_failed_ratio=0.01,
        deferrable=True,
    )
    # [END howto_operator_azure_openai_batch]

    @task
    def report(manifest: dict[str, Any]) -> None:
        print(f"{manifest['backend']}: {manifest['succeeded']} of {manifest['total']} answered in "
              f"{len(manifest['batch_ids'])} batch(es), ${manifest['cost_usd']}; results in "
              f"{manifest['results_path']}")

    report(synthesize.output)


example_azure_openai_batch()
