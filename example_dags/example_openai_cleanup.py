"""Delete, every day, the files our batch runs left on the OpenAI account more than a week ago.

The Files API keeps every uploaded input and every batch's output and error file until someone deletes them.
This DAG deletes only the files this provider created (its uploads, named ``synth-<run key>-s<shard>-r<round>
.jsonl``, and the output/error files of batches whose metadata says ``created_by: airflow-provider-synth``),
never other files of the account and never a file a running batch still uses. The results already landed in
object storage, so nothing is lost. Set ``SYNTH_CLEANUP_DRY_RUN=1`` to only log what would be deleted.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import dag

from airflow_provider_synth.operators.cleanup import OpenAIBatchCleanupOperator


@dag(schedule="@daily", start_date=datetime(2025, 1, 1), catchup=False, tags=["synth", "openai", "example"])
def example_openai_cleanup() -> None:
    # [START howto_operator_openai_cleanup]
    OpenAIBatchCleanupOperator(
        task_id="delete_old_batch_files",
        conn_id="synth_openai_default",
        older_than_days=7,   # keep a week: longer than any run, retries included
        dry_run=os.environ.get("SYNTH_CLEANUP_DRY_RUN", "") == "1",
    )
    # [END howto_operator_openai_cleanup]


example_openai_cleanup()
