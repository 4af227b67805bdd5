"""Deferrable DAGs whose connection is in the metadata database, added by the real ``airflow connections add``.

Issue 21: under ``dag.test()`` and ``airflow dags test`` (Airflow 3.3.2) the trigger runs in-process, where the
Task SDK's async connection lookup cannot reach the metadata database (its in-process supervisor has no
``asend``): on the old main the task submitted its batch (paid for, on OpenAI) and the trigger then failed with
"The conn_id ... isn't defined". An ``AIRFLOW_CONN_*`` variable hid it. The Cortex twin of these tests is
``test_cortex_dags.py::test_deferrable_run_with_a_connection_added_by_the_cli``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_synth.testing.dags import load_dag

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = Path(sys.executable).with_name("airflow")
CONN_ID = "synth_openai_stored"


def _cli_env(**extra: str) -> dict[str, str]:
    """The environment of an ``airflow`` command beside this process: no ``AIRFLOW_CONN_*`` variable, and this
    process's fernet key, so both encrypt and decrypt the stored password alike (as a deployment's processes)."""
    from airflow.configuration import conf

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env["AIRFLOW__CORE__FERNET_KEY"] = conf.get("core", "fernet_key", fallback="") or ""
    env.update(extra)
    return env


def airflow_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(AIRFLOW), *args], env=env or _cli_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


@pytest.fixture
def stored_conn(airflow_db, batch_server, monkeypatch):
    """``synth_openai_stored`` in the test metadata database, added by ``airflow connections add``."""
    for name in [k for k in os.environ if k.startswith("AIRFLOW_CONN_")]:
        monkeypatch.delenv(name)
    airflow_cli("connections", "add", CONN_ID, "--conn-type", "synth_openai", "--conn-password",
                "sk-stored-secret-0000", "--conn-host", batch_server.base_url)
    yield batch_server
    airflow_cli("connections", "delete", CONN_ID)


def _openai_dag(tmp_path, monkeypatch, conn_id: str = CONN_ID):
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path / "out"))
    dag = load_dag("example_openai_batch")
    task = dag.get_task("synthesize")
    task.conn_id, task.poll_interval, task.deferrable = conn_id, 0.2, True
    return dag


def test_dag_test_runs_a_deferrable_task_on_a_connection_added_by_the_cli(stored_conn, tmp_path,
                                                                          monkeypatch) -> None:
    dr = _openai_dag(tmp_path, monkeypatch).test(run_conf={"n_records": 4})
    ti = dr.get_task_instance("synthesize")
    assert ti.state == "success"
    manifest = ti.xcom_pull(task_ids="synthesize")
    assert (manifest["total"], manifest["succeeded"], manifest["conn_id"]) == (4, 4, CONN_ID)
    assert len(stored_conn.batches()) == 1


def test_a_lookup_airflow_cannot_serve_fails_before_anything_is_submitted(stored_conn, tmp_path, monkeypatch,
                                                                          capfd) -> None:
    """Where the in-process trigger's lookup fails (here: an Airflow whose in-process supervisor serves neither
    lookup, stood in for by a failing ``aget_connection``), the task fails before its first upload, saying why
    and what to do."""
    from airflow_provider_synth import _compat

    async def unserved(conn_id: str, hook: object = None) -> object:
        raise LookupError(f"The conn_id `{conn_id}` isn't defined")

    monkeypatch.setattr(_compat, "aget_connection", unserved)
    dr = _openai_dag(tmp_path, monkeypatch).test(run_conf={"n_records": 4})
    assert dr.get_task_instance("synthesize").state == "failed"
    log = "".join(capfd.readouterr())
    assert f"the trigger's async lookup of connection {CONN_ID!r} failed here" in log
    assert "Nothing was submitted" in log and f"AIRFLOW_CONN_{CONN_ID.upper()}" in log and "deferrable=False" in log
    assert stored_conn.batches() == [] and stored_conn.counters["files_created"] == 0
    assert "sk-stored-secret-0000" not in log


def test_airflow_dags_test_on_a_connection_added_by_the_cli(batch_server, tmp_path) -> None:
    """The whole user flow, each step the real command in its own process: db migrate, connections add,
    dags test (the example DAG as shipped: deferrable, its own poll interval)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__CORE__FERNET"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "example_dags"),
               SYNTH_OUTPUT_DIR=str(tmp_path / "out"))
    airflow_cli("db", "migrate", env=env)
    airflow_cli("connections", "add", "synth_openai_default", "--conn-type", "synth_openai", "--conn-password",
                "sk-stored-secret-0000", "--conn-host", batch_server.base_url, env=env)
    done = airflow_cli("dags", "test", "example_openai_batch", "-c", json.dumps({"n_records": 3}), env=env,
                       timeout=400)
    log = done.stdout + done.stderr
    assert "isn't defined" not in log
    (manifest,) = (tmp_path / "out").rglob("manifest.json")
    data = json.loads(manifest.read_text())
    assert (data["status"], data["succeeded"], data["total"]) == ("completed", 3, 3)
    assert len(batch_server.batches()) == 1
