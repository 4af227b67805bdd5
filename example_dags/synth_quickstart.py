"""The quickstart: a few hundred synthesis requests through the OpenAI Batch API flow, end to end.

``make quickstart`` runs this DAG with ``airflow dags test`` against the local Batch API server
(``python -m airflow_provider_synth.server``), so it needs no API key: the answers are the local
server's deterministic stand-ins. Point ``synth_openai_default`` at OpenAI and the same DAG runs for real.
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
# None: the operator's default (60 s against a service, 2 s against a server on this machine)
POLL_INTERVAL = float(os.environ["SYNTH_POLL_INTERVAL"]) if os.environ.get("SYNTH_POLL_INTERVAL") else None
#: how many of the 300 records to send (``make quickstart`` sizes the run to what the machine's engine sustains)
REQUESTS = int(os.environ.get("SYNTH_QUICKSTART_REQUESTS") or 300)
PROMPT = "Write {style} in the voice of {persona}."
SYSTEM = "You write short, vivid texts."
PARAMS = {"temperature": 0.9, "max_completion_tokens": 120}
SEEDS = ["a lighthouse keeper", "a retired astronaut", "a beekeeper", "a night-shift nurse", "a chess prodigy",
         "a street musician", "a glacier scientist", "a bakery owner", "a train conductor", "a museum guard",
         "a deep-sea diver", "a wedding photographer", "a mountain guide", "a translator", "a firefighter",
         "a librarian", "a marathon runner", "a vineyard worker", "a radio host", "a locksmith"]
STYLES = ["a haiku", "a two-line joke", "a one-sentence horror story", "a motivational quote",
          "a product review", "a weather report", "a limerick", "a news headline", "a job ad", "a diary entry",
          "a riddle", "a recipe title", "a tweet", "a fortune cookie message", "a movie tagline"]


@dag(schedule=None, catchup=False, tags=["synth", "quickstart"])
def synth_quickstart() -> None:
    @task
    def seed_records() -> list[dict[str, Any]]:
        """Up to 300 records: every persona in every style."""
        return [{"id": f"qs-{i:03d}-{j:02d}", "persona": p, "style": s}
                for i, p in enumerate(SEEDS) for j, s in enumerate(STYLES)][:REQUESTS]

    synthesize = OpenAIBatchOperator(
        task_id="synthesize",
        conn_id="synth_openai_default",
        requests=seed_records(),
        model="gpt-4o-mini",
        template=RequestTemplate(prompt_template=PROMPT, id_field="id", system=SYSTEM, params=PARAMS),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}",
        poll_interval=POLL_INTERVAL,
        max_cost_usd=1.0,  # refuse to submit a run estimated above $1
        deferrable=True,
    )

    @task
    def summarize(manifest: dict[str, Any]) -> None:
        print(f"{manifest['succeeded']}/{manifest['total']} answered, results in {manifest['results_path']}")

    summarize(synthesize.output)


synth_quickstart()
