"""``make ui``: click through the example DAGs in the Airflow UI, against the local Batch API server.

Starts the local Batch API server on http://127.0.0.1:8787 (state kept in .airflow/server-state, so batches
survive a restart) and ``airflow standalone`` (scheduler, triggerer, API server with the UI on
http://127.0.0.1:8080) on SQLite in .airflow/. The connection ``synth_openai_default`` pointing at the server
is stored in .airflow's metadata database, where the UI, the tasks, ``airflow`` and ``airflow-synth`` all find
it; .airflow/synth.env sets up another shell for them. Every example DAG is unpaused: new ones start unpaused,
and those already in the database (``make quickstart``'s ``airflow dags test`` writes them all, paused, as
Airflow's ``dags_are_paused_at_creation`` default says) are unpaused as soon as the API server is up. A DAG run that stays queued is
explained on the terminal (a DAG paused since, a scheduler that is not up). The admin password is printed by
Airflow and stored in .airflow/simple_auth_manager_passwords.json.generated. Ctrl-C stops both.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from quickstart import (
    BIN,
    HOME,
    OUTPUT,
    REPO,
    airflow_env,
    handle_signals,
    run_child,
    spawn,
    start_server,
    stop_all,
)

CONN_ID = "synth_openai_default"
#: the local Batch API server's port: fixed, so the stored connection stays right across restarts
SERVER_PORT = int(os.environ.get("SYNTH_UI_SERVER_PORT") or 8787)
API_PORT = int(os.environ.get("SYNTH_UI_API_PORT") or 8080)
LOCALHOST = "127.0.0.1"
#: a DAG run queued this long is explained on the terminal (the scheduler starts one within seconds)
QUEUED_NOTICE_S = 30.0


def server_args() -> list[str]:
    """The local Batch API server's options: loopback only, a fixed port, state that survives restarts."""
    return ["--host", LOCALHOST, "--port", str(SERVER_PORT), "--state-dir", str(HOME / "server-state")]


def parallelism() -> int:
    """LocalExecutor worker processes: one per core (Airflow's default of 32 swamps a laptop; deferred batch
    tasks hold no worker while they wait)."""
    return max(2, os.cpu_count() or 2)


def standalone_env() -> dict[str, str]:
    """``airflow standalone``'s environment: the UI on loopback, a parallelism that fits, DAGs unpaused."""
    env = airflow_env()
    env.update({
        "AIRFLOW__API__HOST": LOCALHOST,
        "AIRFLOW__API__PORT": str(API_PORT),
        # where task processes reach the API server: its default (http://localhost:8080/execution/) misses an
        # API on another port, and "localhost" may resolve to ::1, where nothing listens
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{LOCALHOST}:{API_PORT}/execution/",
        # every component and task shares a laptop's cores with the API server: Airflow's 5 s per call failed a
        # task with ReadTimeout on a busy 2-core machine (its docs: raise it under high load)
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism()),
        # a DAG triggered from the UI or the REST API runs at once instead of waiting, queued, for an unpause
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "SYNTH_POLL_INTERVAL": "5",
    })
    return env


def write_connection(port: int = SERVER_PORT) -> Path:
    """Store the connection in .airflow's metadata database and write .airflow/synth.env for other shells.

    :return: the env file (``source`` it to use ``airflow`` and ``airflow-synth`` on this Airflow home).
    """
    env = airflow_env()
    conn = {"conn_type": "synth_openai", "password": "sk-local-ui", "host": f"http://{LOCALHOST}:{port}/v1"}
    # the local server takes any non-empty key; a real key belongs in the connection, never in a file
    subprocess.run([str(BIN / "airflow"), "connections", "delete", CONN_ID], env=env, capture_output=True)
    subprocess.run([str(BIN / "airflow"), "connections", "add", CONN_ID, "--conn-json", json.dumps(conn)],
                   env=env, check=True, capture_output=True)
    env_file = HOME / "synth.env"
    env_file.write_text(
        "# source this file to use `airflow` and `airflow-synth` on the Airflow home of `make ui`\n"
        f"export AIRFLOW_HOME={HOME}\n"
        f"export AIRFLOW__CORE__DAGS_FOLDER={REPO / 'example_dags'}\n"
        "export AIRFLOW__CORE__LOAD_EXAMPLES=False\n"
        f"export PATH={BIN}:$PATH\n"
    )
    return env_file


def unpause_dags(env: dict[str, str]) -> str:
    """Unpause every DAG already in the metadata database of ``env``'s Airflow home (new DAGs start unpaused
    through ``AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION``, but that setting never touches a DAG that exists).

    :return: what it did, for the terminal: the DAGs it unpaused, "none was paused", or the command's error.
    """
    proc = run_child([str(BIN / "airflow"), "dags", "unpause", "--treat-dag-id-as-regex", ".*", "--yes",
                      "--output", "json"], env=env)
    out = proc.stdout.decode(errors="replace")
    table = next((line for line in out.splitlines() if line.startswith("[")), None)  # after Airflow's warnings
    if proc.returncode == 0 and table is not None:
        ids = sorted(row["dag_id"] for row in json.loads(table))
        return f"{len(ids)} ({', '.join(ids)})"
    if "No paused DAGs" in out:
        return "none was paused"
    return f"`airflow dags unpause` failed: {(proc.stderr.decode(errors='replace') or out).strip()[-500:]}"


def api_up() -> bool:
    """Whether Airflow's API server (the UI, and what every task process reports to) answers its health check."""
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{API_PORT}/api/v2/monitor/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _utc(value: object) -> datetime | None:
    """A timestamp as Airflow's SQLite database stores it (UTC, ``YYYY-MM-DD HH:MM:SS[.ffffff]``)."""
    if not isinstance(value, str):
        return None
    stamp = datetime.fromisoformat(value.replace(" ", "T"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def queued_runs(db: Path, now: datetime, older_than_s: float = QUEUED_NOTICE_S) -> list[str]:
    """Why each DAG run queued for more than ``older_than_s`` is still queued, one line each (read from the
    metadata database, read-only, as the scheduler leaves it)."""
    uri = f"file:{db}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=5) as conn:
        runs = conn.execute("SELECT dr.dag_id, dr.run_id, dr.queued_at, d.is_paused FROM dag_run dr "
                            "JOIN dag d ON d.dag_id = dr.dag_id WHERE dr.state = 'queued'").fetchall()
        beat = conn.execute("SELECT MAX(latest_heartbeat) FROM job WHERE job_type = 'SchedulerJob' "
                            "AND state = 'running'").fetchone()[0]
    last_beat = _utc(beat)
    lines = []
    for dag_id, run_id, queued_at, paused in runs:
        since = _utc(queued_at)
        waited = (now - since).total_seconds() if since else 0.0
        if waited < older_than_s:
            continue
        if paused:
            why = (f"the DAG is paused: unpause it (the toggle beside {dag_id} in the UI, or "
                   f"`airflow dags unpause {dag_id}` after `source {HOME / 'synth.env'}`)")
        elif last_beat is None:
            why = ("the scheduler has not started yet (airflow standalone takes a minute or two on a small "
                   "machine); it starts the run as soon as it is up")
        elif (now - last_beat).total_seconds() > older_than_s:
            why = (f"the scheduler stopped (last heartbeat {beat}): see its output above (the lines marked "
                   "'scheduler |')")
        else:
            why = ("the scheduler is up but has not started it: max_active_runs, or every worker slot busy "
                   f"({parallelism()} with AIRFLOW__CORE__PARALLELISM)")
        lines.append(f"{dag_id} run {run_id} has been queued for {waited:.0f} s: {why}")
    return lines


def _explain_queued(told: set[str]) -> set[str]:
    """Print, once per run, why a DAG run sits queued; the runs it printed."""
    db = HOME / "airflow.db"
    try:
        lines = queued_runs(db, datetime.now(UTC)) if db.exists() else []
    except sqlite3.Error:  # locked or mid-migration: next second
        return set()
    fresh = {line.split(" has been", 1)[0]: line for line in lines}
    for key in fresh.keys() - told:
        print(fresh[key], flush=True)
    return set(fresh)


def main() -> int:
    handle_signals()  # SIGTERM and SIGHUP stop everything too, not only Ctrl-C
    try:
        return ui()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_all()  # the server, airflow standalone and its components (each process group, SIGKILL if need be)


def ui() -> int:
    HOME.mkdir(exist_ok=True)
    run_child([str(BIN / "airflow"), "db", "migrate"], env=airflow_env()).check_returncode()
    server, port = start_server(options=server_args())
    env_file = write_connection(port)
    print(f"local Batch API server on http://{LOCALHOST}:{port}/v1 (answers are stand-ins, not a model); "
          f"state in {HOME / 'server-state'}")
    airflow = spawn([str(BIN / "airflow"), "standalone"], env=standalone_env())
    print(f"""airflow standalone starting ({parallelism()} worker processes): open http://{LOCALHOST}:{API_PORT} and
trigger synth_quickstart (every example DAG is unpaused once the UI is up; a run that stays queued is
explained here).
connection {CONN_ID} -> the local server, stored in {HOME / 'airflow.db'}; in another shell:
  source {env_file}
  airflow-synth status {OUTPUT}/synth_quickstart/<run_id>
Ctrl-C stops both.""", flush=True)
    told: set[str] = set()
    unpaused = False
    while airflow.poll() is None and server.poll() is None:
        time.sleep(1)
        if not unpaused and api_up():
            # only now: a task started before the API server listens fails at once ("Connection refused"),
            # which a scheduled DAG unpaused earlier would meet on a slow machine
            print(f"unpaused the DAGs already in {HOME / 'airflow.db'}: {unpause_dags(airflow_env())}", flush=True)
            unpaused = True
        told |= _explain_queued(told)
    return 0


if __name__ == "__main__":
    sys.exit(main())
