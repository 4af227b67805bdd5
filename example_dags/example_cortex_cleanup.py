"""Drop, every day, the Cortex staging tables that failed runs left in Snowflake more than a week ago.

``CortexBatchOperator`` keeps a run's staging tables (its prompts, answers and statements) after a failure, so
that a retry resumes without paying twice; a run nobody retries leaves them behind. This DAG drops only the
tables this provider created (named ``SYNTH_CORTEX_<16 hex>_{REQUESTS,RESULTS,STATEMENTS}`` and carrying its
comment), never another table, and never those of a run whose statements may still be running. The answers of
finished runs are already in their output folders. Set ``SYNTH_CLEANUP_DRY_RUN=1`` to only log what would be
dropped.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import dag

from airflow_provider_synth.operators.cortex import CortexStagingCleanupOperator


@dag(schedule="@daily", start_date=datetime(2025, 1, 1), catchup=False, tags=["synth", "cortex", "example"])
def example_cortex_cleanup() -> None:
    # [START howto_operator_cortex_staging_cleanup]
    CortexStagingCleanupOperator(
        task_id="drop_old_staging_tables",
        snowflake_conn_id="snowflake_default",
        older_than_days=7,   # keep a week: longer than any run, retries included
        dry_run=os.environ.get("SYNTH_CLEANUP_DRY_RUN", "") == "1",
    )
    # [END howto_operator_cortex_staging_cleanup]


example_cortex_cleanup()
