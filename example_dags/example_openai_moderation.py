"""Generate, then moderate, then keep only the rows the moderation model did not flag.

A synthetic-data pipeline's safety filter: the first batch writes short support replies; the second sends each
reply to ``/v1/moderations`` (``omni-moderation-latest``, free on OpenAI, counted at $0) through the same Batch
API; the last task keeps the unflagged replies (``flagged_ids``) in a curated file beside the outputs. Rows
never travel through XCom: the moderation input is a JSONL file written next to the generation's results.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator, RequestTemplate

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
POLL_INTERVAL = float(os.environ.get("SYNTH_POLL_INTERVAL", "60"))
ISSUES = ["a late parcel", "a double charge", "a broken zipper", "a password reset", "a missing refund"]


@dag(schedule=None, catchup=False, tags=["synth", "openai", "moderation", "example"], params={"n_records": 50})
def example_openai_moderation() -> None:
    @task
    def make_records(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        n = int((params or {}).get("n_records", 50))
        return [{"id": f"reply-{i:05d}", "issue": ISSUES[i % len(ISSUES)]} for i in range(n)]

    generate = OpenAIBatchOperator(
        task_id="generate",
        conn_id="synth_openai_default",
        requests=make_records(),
        model="gpt-4o-mini",
        template=RequestTemplate(system="You are a patient support agent.",
                                 prompt_template="Reply to a customer writing about {issue}.", id_field="id",
                                 params={"max_completion_tokens": 200}),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}/generate",
        poll_interval=POLL_INTERVAL,
        max_cost_usd=5.0,
        deferrable=True,
    )

    # [START howto_operator_openai_moderation]
    @task
    def moderation_requests(manifest: dict[str, Any]) -> str:
        """One /v1/moderations request per generated reply (same custom_id), streamed into a JSONL file."""
        from airflow_provider_synth.batch.extract import extract_text, iter_output
        from airflow_provider_synth.batch.paths import as_path, join_path, open_path
        from airflow_provider_synth.batch.requests import MODERATIONS, build_requests, write_requests

        replies = ({"id": line["custom_id"], "text": extract_text(line) or ""}
                   for line in iter_output(manifest["results_path"]))
        path = join_path(as_path(manifest["output_dir"]), "moderation-requests.jsonl")
        with open_path(path, "wb") as fp:
            write_requests(build_requests(replies, model="omni-moderation-latest", endpoint=MODERATIONS,
                                          id_field="id"), fp)
        return str(path)

    moderate = OpenAIBatchOperator(
        task_id="moderate",
        conn_id="synth_openai_default",
        input_path=moderation_requests(generate.output),
        model="omni-moderation-latest",
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}/moderate",
        poll_interval=POLL_INTERVAL,
        deferrable=True,
    )

    @task
    def keep_unflagged(generated: dict[str, Any], moderated: dict[str, Any]) -> dict[str, int]:
        """Copy the replies the moderation model did not flag (and that it answered) into ``curated.jsonl``."""
        from airflow_provider_synth.batch.extract import flagged_ids, iter_moderations, iter_output
        from airflow_provider_synth.batch.jsonl import dumps
        from airflow_provider_synth.batch.paths import as_path, join_path, open_path

        flagged = flagged_ids(moderated["results_path"])
        checked = {m.custom_id for m in iter_moderations(moderated["results_path"])}
        kept = 0
        with open_path(join_path(as_path(generated["output_dir"]), "curated.jsonl"), "wb") as fp:
            for line in iter_output(generated["results_path"]):
                if line["custom_id"] in checked and line["custom_id"] not in flagged:
                    fp.write(dumps(line) + b"\n")
                    kept += 1
        print(f"kept {kept} of {generated['succeeded']} replies; {len(flagged)} flagged, "
              f"{generated['succeeded'] - len(checked)} not moderated")
        return {"kept": kept, "flagged": len(flagged), "unchecked": generated["succeeded"] - len(checked)}
    # [END howto_operator_openai_moderation]

    keep_unflagged(generate.output, moderate.output)


example_openai_moderation()
