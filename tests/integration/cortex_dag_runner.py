"""Run one example DAG under ``dag.test()`` with the Cortex fakes; print a JSON summary as the last line.

Run in a fresh interpreter by tests/integration/test_cortex_dags.py, with its own ``AIRFLOW_HOME`` (set by the
caller before Airflow is imported), so each run has its own metadata database.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def leave_staging_tables(runs: list[dict[str, Any]]) -> None:
    """Create the staging tables runs left, as ``CortexBatchOperator`` creates them: ``{"key", "run_id",
    "age_days", "submitting"}``; ``submitting``: an intent written just now and no query id yet (a worker in the
    middle of a submit: its statement may be running)."""
    from airflow_provider_synth.hooks.cortex import CortexHook
    from airflow_provider_synth.runs.cortex_sql import STAGING_COMMENT, StagingTables

    hook = CortexHook()
    try:
        for run in runs:
            tables = StagingTables(None, None, f"SYNTH_CORTEX_{run['key']}")
            info = {"dag_id": "example_cortex_synthesis", "task_id": "synthesize", "run_id": run["run_id"],
                    "map_index": -1, "model": "llama3.1-8b", "created_at": time.time() - run["age_days"] * 86400}
            hook.run_statements(tables.create(f"{STAGING_COMMENT} {json.dumps(info)}"))
            if run.get("submitting"):
                hook.run_statements([tables.record_intent(0, "intent-0", 1, time.time(), hook.session_id, "{}")])
    finally:
        hook.close()


def add_connection_with_cli(conn_id: str, conn: dict[str, Any]) -> None:
    """``airflow connections add CONN_ID --conn-json ...``: the real CLI, in its own process, on this process's
    ``AIRFLOW_HOME`` (so into the same metadata database)."""
    import subprocess

    os.environ.pop(f"AIRFLOW_CONN_{conn_id.upper()}", None)
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "connections", "add", conn_id, "--conn-json", json.dumps(conn)], check=True,
                   capture_output=True, timeout=120)


def set_poll_interval(dag: Any, seconds: float) -> None:
    """Poll every ``seconds`` in the DAG's Cortex tasks, mapped ones included."""
    from airflow_provider_synth.operators.cortex import CortexBatchOperator

    for task in dag.tasks:
        if isinstance(task, CortexBatchOperator):
            task.poll_interval = seconds
        elif issubclass(getattr(task, "operator_class", object), CortexBatchOperator):
            task.partial_kwargs["poll_interval"] = seconds


def main(config: dict[str, Any]) -> dict[str, Any]:
    from airflow.utils import db
    from snowflake.connector.errors import ProgrammingError

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fakes
    from fakes.cortex import FakeCortex, FakeSqlApi

    from airflow_provider_synth.testing.dags import dag_bag

    db.initdb()
    extra: dict[str, Any] = {"account": "acct", "database": "SYNTH_DB", "warehouse": "WH"}
    api = FakeSqlApi(running_polls=config.get("running_polls", 2))
    with contextlib.ExitStack() as stack:
        if config.get("deferrable"):
            stack.enter_context(api.serve())
            extra.update(host="127.0.0.1", port=api.port, protocol="http", authenticator="programmatic_access_token")
        conn = {"conn_type": "snowflake", "login": "synth", "password": config["secret"], "schema": "PUBLIC",
                "extra": extra}
        if config.get("stored_connection"):  # in the metadata database, as `airflow connections add` puts it
            add_connection_with_cli("snowflake_default", conn)
        else:
            os.environ["AIRFLOW_CONN_SNOWFLAKE_DEFAULT"] = json.dumps(conn)
        fake = stack.enter_context(FakeCortex(fail_marker=config.get("fail_marker", "[fail]"),
                                              abort_after=config.get("abort_after"),
                                              background=bool(config.get("background"))))
        if fake.background:
            api.account = fake  # the SQL API reports the statements' real state
        for pattern, message in config.get("fail_next", []):
            fake.fail_next(pattern, ProgrammingError(msg=message, errno=1))
        leave_staging_tables(config.get("staging_runs", []))
        for sql in config.get("sql", []):
            fake.query(sql)
        bag = dag_bag(dag_folder=config["dag_file"])
        assert not bag.import_errors, bag.import_errors
        dag = bag.dags[config["dag_id"]]
        # the examples poll every 10 s; the fake's statements end in milliseconds, and a test needs no such patience
        set_poll_interval(dag, float(config.get("poll_interval", 0.5)))
        dag_run = dag.test()
        # a mapped task instance is "task_id[map_index]"
        tis = {ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]":
               {"state": str(ti.state), "try_number": ti.try_number,
                "xcom": ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index)}
               for ti in dag_run.get_task_instances()}
        leftover = [str(r) for r in fake.query("SHOW TABLES") if "SYNTH_" in str(r)]
        tables = sorted(str(r[1]) for r in fake.query("SHOW TABLES"))
        xcoms = {t: dag_run.get_task_instance(t).xcom_pull(task_ids=t) for t in config.get("xcom_tasks", [])}
        fake.wait_idle()
        chunk_queries = [q for q in fake.queries.values() if q.query_type == "INSERT" and "_RESULTS" in q.text]
        chunks = sorted(q.query_id for q in chunk_queries)
        return {"state": str(dag_run.state), "run_id": dag_run.run_id, "tasks": tis, "calls": fake.calls,
                "chunk_statements": chunks,
                "chunk_tags": {q.query_id: json.loads(q.query_tag or "{}") for q in chunk_queries},
                "cancelled": fake.cancelled, "polls": api.polls, "auth_headers": sorted(set(api.auth_headers)),
                "leftover_tables": leftover, "tables": tables, "xcoms": xcoms}


if __name__ == "__main__":
    summary = main(json.loads(sys.argv[1]))
    out = Path(os.environ["SYNTH_OUTPUT_DIR"])
    manifests = sorted(str(p) for p in out.rglob("manifest.json"))
    summary["manifests"] = [json.loads(Path(p).read_text()) for p in manifests]
    print("\n" + json.dumps(summary))
