"""Run Cortex AI_COMPLETE over an existing Snowflake table, without moving its rows out of Snowflake.

The source table needs a unique id column and a prompt column (text) or a messages column (an array of
``{role, content}`` objects). The operator checks the ids and prompts in Snowflake, stages the rows
server-side, answers them in chunks and writes the usual output folder (``results.jsonl``,
``failures.jsonl``, ``manifest.json``). The first task only creates a demo table.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.sdk import dag

from airflow_provider_synth.operators.cortex import CortexBatchOperator, CortexConfig, CortexStaging
from airflow_provider_synth.runs.cortex_sql import TableSource

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))


@dag(schedule=None, catchup=False, tags=["synth", "cortex", "example"])
def example_cortex_table() -> None:
    create_demo_table = SQLExecuteQueryOperator(
        task_id="create_demo_table",
        conn_id="snowflake_default",
        sql=[
            "CREATE OR REPLACE TABLE SUPPORT_TICKETS (TICKET_ID NUMBER, BODY VARCHAR)",
            "INSERT INTO SUPPORT_TICKETS (TICKET_ID, BODY) VALUES "
            "(101, 'My order arrived damaged, what now?'), (102, 'How do I change my delivery address?'), "
            "(103, 'The app logs me out every five minutes.'), (104, 'Can I pay with two cards?'), "
            "(105, 'Where is my refund?')",
        ],
    )

    # [START howto_operator_cortex_table]
    triage = CortexBatchOperator(
        task_id="triage_tickets",
        source_table=TableSource(
            table="SUPPORT_TICKETS",
            id_column="TICKET_ID",
            prompt_column="BODY",
            params={
                "temperature": 0,
                "max_tokens": 100,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "triage",
                        "schema": {
                            "type": "object",
                            "properties": {"category": {"type": "string"}, "urgent": {"type": "boolean"}},
                            "required": ["category", "urgent"],
                        },
                    },
                },
            },
        ),
        model="mistral-large2",
        output_path=OUTPUT_DIR + "/{{ run_id }}/cortex-table",
        conn_id="snowflake_default",
        config=CortexConfig(chunk_size=2, staging=CortexStaging(table_prefix="SYNTH_TRIAGE"),
                            keep_staging_tables=False),
        max_failed_ratio=0.2,
        retries=2,
        retry_delay=timedelta(seconds=1),
    )
    # [END howto_operator_cortex_table]

    create_demo_table >> triage


example_cortex_table()
