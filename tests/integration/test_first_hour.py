"""What a new user meets in the first hour: errors that say what to do, and no noise on the way."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_synth.testing.dags import load_dag


@pytest.mark.integration
def test_a_missing_input_path_fails_naming_the_path_without_link_noise(airflow_db, openai_conn, tmp_path,
                                                                         monkeypatch, capfd) -> None:
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    missing = tmp_path / "nowhere" / "requests.jsonl"
    dag = load_dag("example_openai_batch")
    task = dag.get_task("synthesize")
    task.input_path, task.requests = str(missing), None
    dr = dag.test(run_conf={"n_records": 3})
    assert dr.get_task_instance("synthesize").state == "failed"
    out = capfd.readouterr()
    log = out.out + out.err
    assert f"input_path {missing} does not exist; nothing was submitted" in log
    # Airflow reads the task's links as it ends: a link never persisted must not be looked up in XCom
    assert "XCom not found" not in log
    assert not openai_conn.batches()


# -- make ui (scripts/ui.py) ---------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def load_ui(monkeypatch, home: Path):
    """scripts/ui.py as `make ui` runs it, on the Airflow home ``home``."""
    monkeypatch.setenv("SYNTH_QUICKSTART_HOME", str(home))
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    for name in ("quickstart", "ui"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("ui")


def test_ui_binds_loopback_on_fixed_ports_with_kept_state_and_a_fitting_parallelism(monkeypatch,
                                                                                    tmp_path) -> None:
    from airflow_provider_synth.server.server import config_from_args

    ui = load_ui(monkeypatch, tmp_path)
    config = config_from_args(ui.server_args())  # the server's own parser takes them
    assert (config.host, config.port, config.state_dir) == ("127.0.0.1", 8787, str(tmp_path / "server-state"))
    env = ui.standalone_env()
    assert (env["AIRFLOW__API__HOST"], env["AIRFLOW__API__PORT"]) == ("127.0.0.1", "8080")
    # tasks reach the API where it listens (a port from SYNTH_UI_API_PORT too), never through "localhost"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:8080/execution/"
    assert float(env["AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT"]) >= 30
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) == max(2, os.cpu_count() or 2)
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "False"
    assert env["AIRFLOW_HOME"] == str(tmp_path)
    # the connection comes from the metadata database, where the UI shows it and other shells find it
    assert "AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT" not in env


@pytest.mark.integration
def test_ui_connection_is_found_by_airflow_synth_from_another_shell(monkeypatch, tmp_path, batch_server) -> None:
    from openai import OpenAI

    home = tmp_path / "airflow-home"
    home.mkdir()
    ui = load_ui(monkeypatch, home)
    for name in [k for k in os.environ if k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))] + ["AIRFLOW_HOME"]:
        monkeypatch.delenv(name, raising=False)
    subprocess.run([str(ui.BIN / "airflow"), "db", "migrate"], env=ui.airflow_env(), check=True,
                   capture_output=True, timeout=300)
    env_file = ui.write_connection(batch_server.port)
    client = OpenAI(base_url=batch_server.base_url, api_key="sk-any")
    upload = client.files.create(file=("in.jsonl", b'{"custom_id": "a", "method": "POST", "url": '
                                       b'"/v1/chat/completions", "body": {"model": "gpt-4o-mini", "messages": '
                                       b'[{"role": "user", "content": "hi"}]}}\n'), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    # a new shell: nothing but what synth.env exports
    shell_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(["bash", "-c", f"source {env_file} && airflow-synth --json status --batch-id {batch.id}"],
                          env=shell_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    assert data["conn_id"] == "synth_openai_default"
    assert [b["batch_id"] for b in data["batches"]] == [batch.id]


@pytest.mark.integration
def test_ui_unpauses_the_dags_the_quickstart_left_paused_and_explains_a_queued_run(monkeypatch,
                                                                                   tmp_path) -> None:
    """`make quickstart` (``airflow dags test``) writes every example DAG to the database, paused, as Airflow's
    ``dags_are_paused_at_creation`` default says; `make ui` used to leave them so (README: unpaused), and a
    triggered run sat queued with no message. Old main: every DAG stays paused."""
    import sqlite3
    from datetime import UTC, datetime, timedelta

    home = tmp_path / "airflow-home"
    home.mkdir()
    ui = load_ui(monkeypatch, home)
    for name in [k for k in os.environ if k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))] + ["AIRFLOW_HOME"]:
        monkeypatch.delenv(name, raising=False)
    env = ui.airflow_env()

    def airflow(*args: str) -> None:
        subprocess.run([str(ui.BIN / "airflow"), *args], env=env, check=True, capture_output=True, timeout=300)

    def paused() -> dict[str, int]:
        with sqlite3.connect(home / "airflow.db") as conn:
            return dict(conn.execute("SELECT dag_id, is_paused FROM dag").fetchall())

    airflow("db", "migrate")
    airflow("dags", "reserialize")  # what the quickstart's `airflow dags test` writes: every DAG of the folder
    before = paused()
    assert "synth_quickstart" in before and len(before) >= 10 and all(before.values())
    said = ui.unpause_dags(env)
    assert not any(paused().values()), paused()
    assert said.startswith(f"{len(before)} (") and "synth_quickstart" in said, said
    assert ui.unpause_dags(env) == "none was paused"

    airflow("dags", "pause", "synth_quickstart")
    airflow("dags", "trigger", "synth_quickstart")  # no scheduler here: the run stays queued
    later = datetime.now(UTC) + timedelta(seconds=ui.QUEUED_NOTICE_S + 5)
    assert ui.queued_runs(home / "airflow.db", datetime.now(UTC)) == []  # not yet worth a word
    (line,) = ui.queued_runs(home / "airflow.db", later)
    assert line.startswith("synth_quickstart run manual__") and "the DAG is paused" in line
    assert "airflow dags unpause synth_quickstart" in line
    airflow("dags", "unpause", "synth_quickstart")
    (line,) = ui.queued_runs(home / "airflow.db", later)
    assert "the scheduler has not started yet" in line


# -- errors that name the server, the connection and the way out --------------------------------------------

CHAT = "/v1/chat/completions"


def _use_server(monkeypatch, base_url: str) -> str:
    from airflow.sdk import Connection

    conn = Connection(conn_id="synth_first_hour", conn_type="synth_openai", password="sk-first-hour",
                      host=base_url, extra=json.dumps({"max_retries": 0, "timeout": 5}))
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_FIRST_HOUR", conn.as_json())
    return "synth_first_hour"


def _plan(tmp_path: Path, conn_id: str):
    import orjson

    from airflow_provider_synth.batch.paths import join_path, open_path
    from airflow_provider_synth.batch.split import split_requests
    from airflow_provider_synth.runs.openai import Plan

    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "requests.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q {i}"}]}}) + b"\n" for i in range(3)))
    work = str(tmp_path / "out" / "_work")
    split = split_requests(str(src), lambda i: open_path(join_path(work, f"shards/shard-{i:05d}-r0.jsonl"), "wb"),
                           name=str(src))
    plan = Plan(key="f1f2f3f4f5f6f7f8f9f0a1a2a3a4a5a6", conn_id=conn_id, endpoint=CHAT, model=split.model,
                completion_window="24h", work_dir=work, output_dir=str(tmp_path / "out"),
                shards=[s.as_dict() for s in split.shards], total=split.total, fingerprint=split.fingerprint)
    plan.save(work)
    return plan


def test_an_unreachable_server_is_named_with_its_connection(monkeypatch, tmp_path) -> None:
    import socket

    from airflow_provider_synth.exceptions import ServerUnreachableError
    from airflow_provider_synth.hooks.openai import OpenAIBatchHook
    from airflow_provider_synth.runs.openai import BatchRun

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn_id = _use_server(monkeypatch, f"http://127.0.0.1:{port}/v1")
    run = BatchRun(OpenAIBatchHook(conn_id), _plan(tmp_path, conn_id))
    with pytest.raises(ServerUnreachableError, match=rf"cannot reach http://127\.0\.0\.1:{port}/v1/ "
                                                     r"\(connection 'synth_first_hour'\)"):
        run.discover()


def test_a_batch_the_server_forgot_says_how_to_start_over(monkeypatch, tmp_path, batch_server_factory) -> None:
    from airflow_provider_synth.exceptions import BatchGoneError
    from airflow_provider_synth.hooks.openai import OpenAIBatchHook
    from airflow_provider_synth.runs.openai import BatchRun, Plan

    conn_id = _use_server(monkeypatch, batch_server_factory().base_url)
    plan = _plan(tmp_path, conn_id)
    run = BatchRun(OpenAIBatchHook(conn_id), plan)
    run.submit(run.next_round(0))
    assert len(run.batch_ids) == 1
    # the server restarted without its state: a fresh one on another port, the connection pointed at it
    fresh = batch_server_factory()
    _use_server(monkeypatch, fresh.base_url)
    again = BatchRun(OpenAIBatchHook(conn_id), Plan.load(plan.work_dir))
    with pytest.raises(BatchGoneError) as err:
        again.discover()
    message = str(err.value)
    assert run.batch_ids[0] in message and fresh.base_url in message and "'synth_first_hour'" in message
    assert f"delete its work folder {plan.work_dir} and retry the task" in message


# -- object storage extras ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "extra", "modules"), [
    ("s3://bucket/synth/run-1", "s3", ("apache-airflow-providers-amazon", "s3fs")),
    ("gs://bucket/synth/run-1", "gcs", ("apache-airflow-providers-google", "gcsfs")),
])
def test_an_object_store_url_without_its_extra_names_the_extra(url, extra, modules) -> None:
    import importlib.util
    import tomllib

    from airflow_provider_synth.batch.paths import STORAGE_EXTRAS, as_path

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    assert all(any(d.startswith(m) for d in declared) for m in modules), declared
    needed = STORAGE_EXTRAS[url.split(":")[0]][1]
    if all(importlib.util.find_spec(m.split(".")[0]) and importlib.util.find_spec(m) for m in needed):
        pytest.skip(f"the {extra} extra is installed here")
    with pytest.raises(ImportError, match=rf"pip install 'airflow-provider-synth\[{extra}\]'"):
        as_path(url)
    assert str(as_path("memory://bucket/x")).startswith("memory://")  # fsspec's own filesystems need no extra


# -- airflow-synth cleanup RUN ----------------------------------------------------------------------------------


def test_cleanup_of_one_run_deletes_that_runs_files_only(monkeypatch, tmp_path, batch_server_factory,
                                                         capsys) -> None:
    from airflow_provider_synth.batch.manifest import build_manifest, write_manifest
    from airflow_provider_synth.cli import EXIT_OK, main
    from airflow_provider_synth.hooks.openai import OpenAIBatchHook
    from airflow_provider_synth.runs.openai import BatchRun

    server = batch_server_factory()
    conn_id = _use_server(monkeypatch, server.base_url)
    outs = {}
    for name, key in (("a", "a" * 32), ("b", "b" * 32)):
        plan = _plan(tmp_path / name, conn_id)
        plan.key = key
        plan.save(plan.work_dir)
        run = BatchRun(OpenAIBatchHook(conn_id), plan)
        run.submit(run.next_round(0))
        write_manifest(plan.output_dir, build_manifest(
            backend="openai", accounting={"total": plan.total}, output_dir=plan.output_dir, status="submitted",
            batch_ids=run.batch_ids, idempotency_key=key, work_dir=plan.work_dir, conn_id=conn_id, dag_id="d",
            task_id="t", run_id=name, map_index=-1, try_number=1))
        outs[name] = plan.output_dir
    server.wait_idle()
    client = OpenAIBatchHook(conn_id).client
    before = {f.id: f.filename for f in client.files.list()}
    assert len(before) == 4  # an upload and an output per run

    capsys.readouterr()
    assert main(["--json", "cleanup", outs["a"]]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["run_key"] == "a" * 32 and data["deleted"] == 2 and data["older_than_days"] == 0
    left = {f.id: f.filename for f in client.files.list()}
    assert len(left) == 2 and any(name.startswith("synth-" + "b" * 32) for name in left.values())
    assert set(data["file_ids"]) == set(before) - set(left)
    assert main(["cleanup"]) == 2  # neither a run nor --older-than


# -- the local server's outcome kinds ------------------------------------------------------------------------


def test_an_unknown_outcome_kind_is_refused_with_the_kinds_listed_and_documented(batch_server) -> None:
    import urllib.error
    import urllib.request

    from airflow_provider_synth.server.config import FAULT_KINDS, OUTCOME_KINDS

    assert OUTCOME_KINDS == ("success", "error", "batch_expired", "request_timeout", "unreadable", "cut_off")
    body = json.dumps({"add_outcomes": [{"pattern": "x*", "outcome": {"kind": "failure"}}]}).encode()
    request = urllib.request.Request(batch_server.base_url.removesuffix("/v1") + "/_synth/config", data=body,
                                     headers={"Authorization": "Bearer x", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    message = json.loads(err.value.read())["error"]["message"]
    assert ("unknown outcome kind 'failure'; the kinds are success, error, batch_expired, request_timeout, "
            "unreadable, cut_off") in message
    docs = (REPO / "docs" / "testing_server.md").read_text()
    outcomes = docs[docs.index("## Outcomes"):docs.index("## Faults")]
    faults = docs[docs.index("## Faults"):docs.index("## Settings")]
    assert all(f"| `{kind}` |" in outcomes for kind in OUTCOME_KINDS)
    assert all(f"| `{kind}` |" in faults for kind in FAULT_KINDS)
