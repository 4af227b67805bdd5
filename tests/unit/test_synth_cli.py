"""``airflow-synth``: status, download, cancel and cleanup against the local Batch API server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from airflow.sdk import Connection

from airflow_provider_synth.batch.manifest import build_manifest, write_manifest
from airflow_provider_synth.batch.paths import join_path, open_path
from airflow_provider_synth.batch.split import ShardLimits, split_requests
from airflow_provider_synth.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.runs.openai import BatchRun, Plan
from airflow_provider_synth.server.server import Outcome

API_KEY = "sk-cli-SECRET-97531864"
CONN = "synth_cli"
CHAT = "/v1/chat/completions"
SCRIPT = Path(sys.executable).parent / "airflow-synth"


@pytest.fixture
def server(batch_server_factory):
    return batch_server_factory(api_key=API_KEY)


@pytest.fixture
def conn(monkeypatch, server) -> str:
    c = Connection(conn_id=CONN, conn_type="synth_openai", password=API_KEY, host=server.base_url,
                   extra=json.dumps({"max_retries": 0, "timeout": 10}))
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", c.as_json())
    return CONN


def submit_run(tmp_path: Path, n: int = 25, per_shard: int = 10) -> Path:
    """Submit a run the way the operator does (split, plan, BatchRun.submit) and write its 'submitted'
    manifest; returns the output folder."""
    src = tmp_path / "requests.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"custom_id": f"req-{i:03d}", "method": "POST", "url": CHAT, "body": {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]}}) + b"\n"
        for i in range(n)))
    out = tmp_path / "out"
    work = str(out / "_work")
    split = split_requests(str(src), lambda i: open_path(join_path(work, f"shards/shard-{i:05d}-r0.jsonl"), "wb"),
                           limits=ShardLimits(max_requests=per_shard), name=str(src))
    plan = Plan(key="c1c2c3c4c5c6c7c8c9c0d1d2d3d4d5d6", conn_id=CONN, endpoint=CHAT, model=split.model,
                completion_window="24h", work_dir=work, output_dir=str(out),
                shards=[s.as_dict() for s in split.shards], total=split.total, fingerprint=split.fingerprint)
    plan.save(work)
    run = BatchRun(OpenAIBatchHook(CONN), plan)
    run.submit(run.next_round(0))
    write_manifest(str(out), build_manifest(
        backend="openai", accounting={"total": plan.total}, output_dir=str(out), status="submitted",
        batch_ids=run.batch_ids, idempotency_key=plan.key, work_dir=work, conn_id=CONN, dag_id="d", task_id="t",
        run_id="r", map_index=-1, try_number=1))
    return out


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *args: str) -> tuple[int, dict]:
    code, out, err = run_cli(capsys, "--json", *args)
    assert not err, err
    return code, json.loads(out)


# -- status ------------------------------------------------------------------------------------------------------


def test_status_of_a_running_run(conn, server, tmp_path, capsys) -> None:
    server.configure(in_progress_s=30)
    out = submit_run(tmp_path)
    code, data = run_json(capsys, "status", str(out))
    assert code == EXIT_OK
    assert [(b["shard"], b["round"]) for b in data["batches"]] == [(0, 0), (1, 0), (2, 0)]
    assert {b["status"] for b in data["batches"]} <= {"validating", "in_progress"}
    assert data["totals"]["requests"]["total"] == 25 and data["totals"]["finished"] is False
    assert data["total_requests"] == 25 and data["conn_id"] == CONN  # conn id taken from the manifest
    code, text, _ = run_cli(capsys, "status", str(out))
    assert code == EXIT_OK and text.splitlines()[-1].endswith("; still running")


def test_status_of_a_finished_run_as_text(conn, server, tmp_path, capsys) -> None:
    out = submit_run(tmp_path)
    server.wait_idle()
    code, text, _ = run_cli(capsys, "status", str(out / "manifest.json"))
    assert code == EXIT_OK
    lines = text.splitlines()
    assert lines[0].split() == ["batch", "shard", "round", "status", "completed", "failed", "total", "progress"]
    assert [line.split()[1:6] for line in lines[1:4]] == [["0", "0", "completed", "10", "0"],
                                                          ["1", "0", "completed", "10", "0"],
                                                          ["2", "0", "completed", "5", "0"]]
    assert lines[4].split() == ["total", "3", "25", "0", "25", "100.0%"]
    assert lines[-1] == "3 batch(es): 3 completed; all finished"


def test_status_by_batch_ids(conn, server, tmp_path, capsys) -> None:
    out = submit_run(tmp_path)
    server.wait_idle()
    ids = json.loads((out / "manifest.json").read_text())["batch_ids"]
    code, data = run_json(capsys, "status", "--conn-id", CONN, "--batch-id", ids[0], "--batch-id", ids[2])
    assert code == EXIT_OK and [b["batch_id"] for b in data["batches"]] == [ids[0], ids[2]]
    assert data["totals"]["requests"] == {"total": 15, "completed": 15, "failed": 0, "pending": 0, "source": "batches"}
    assert data["totals"]["progress"] == 1.0


# -- download ----------------------------------------------------------------------------------------------------


def test_download_merges_every_round_into_the_output_folder(conn, server, tmp_path, capsys) -> None:
    server.set_outcome("req-00[0-2]", Outcome.error(400, code="invalid_prompt"))
    out = submit_run(tmp_path)
    code, data = run_json(capsys, "download", str(out), "--wait", "--poll-interval", "0.05")
    assert code == EXIT_OK
    assert (data["total"], data["succeeded"], data["failed"], data["missing"]) == (25, 22, 3, 0)
    assert data["status"] == "completed" and data["collected_by"] == "airflow-synth"
    assert (data["dag_id"], data["task_id"], data["run_id"]) == ("d", "t", "r")
    ids = [orjson.loads(line)["custom_id"] for line in (out / "results.jsonl").read_bytes().splitlines()]
    assert ids == [f"req-{i:03d}" for i in range(3, 25)]  # input order
    fails = [orjson.loads(line) for line in (out / "failures.jsonl").read_bytes().splitlines()]
    assert [f["custom_id"] for f in fails] == ["req-000", "req-001", "req-002"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["succeeded"] == 22 and on_disk["usage"]["prompt_tokens"] > 0 and on_disk["cost_usd"] > 0
    assert API_KEY not in (out / "manifest.json").read_text()
    assert server.counters["batches_created"] == 3  # download submits nothing


def test_download_into_another_folder_with_text_output(conn, server, tmp_path, capsys) -> None:
    out = submit_run(tmp_path)
    server.wait_idle()
    dest = tmp_path / "landed"
    code, text, err = run_cli(capsys, "download", str(out), "--output", str(dest))
    assert code == EXIT_OK, err
    assert text.splitlines()[0] == "25 succeeded, 0 failed, 0 missing of 25 request(s) from 3 batch(es)"
    assert f"results:  {dest}/results.jsonl" in text
    assert len((dest / "results.jsonl").read_bytes().splitlines()) == 25
    assert not (out / "results.jsonl").exists()


def test_download_while_running_fails_with_a_hint(conn, server, tmp_path, capsys) -> None:
    server.configure(in_progress_s=30)
    out = submit_run(tmp_path)
    code, text, err = run_cli(capsys, "download", str(out))
    assert code == EXIT_FAILURE and text == ""
    assert "3 of 3 batch(es) still running" in err and "--wait" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "download", str(out), "--wait", "--poll-interval", "0.05", "--timeout", "0.3")
    assert code == EXIT_FAILURE and "gave up after 0.3s" in err
    assert not (out / "results.jsonl").exists()


# -- cancel ------------------------------------------------------------------------------------------------------


def test_cancel_running_batches_then_collect_partial_results(conn, server, tmp_path, capsys) -> None:
    server.configure(in_progress_s=30)
    out = submit_run(tmp_path)
    code, data = run_json(capsys, "cancel", str(out))
    assert code == EXIT_OK and data["cancelled"] == 3 and data["errors"] == 0
    assert {b["status"] for b in data["batches"]} <= {"cancelling", "cancelled"}
    server.wait_idle()
    assert server.counters["batches_cancelled"] == 3
    # a second cancel leaves finished batches alone
    code, text, _ = run_cli(capsys, "cancel", str(out))
    assert code == EXIT_OK and text.splitlines()[-1] == "0 batch(es) cancelled, 0 error(s)"
    assert "left alone (cancelled)" in text
    code, data = run_json(capsys, "download", str(out))
    assert code == EXIT_OK and data["succeeded"] + data["failed"] + data["missing"] == 25
    assert data["error_codes"].get("batch_cancelled", 0) == data["failed"]


def test_cancel_reports_api_errors_per_batch(conn, server, tmp_path, capsys) -> None:
    server.configure(in_progress_s=30)
    out = submit_run(tmp_path)
    ids = json.loads((out / "manifest.json").read_text())["batch_ids"]
    server.add_fault("POST /v1/batches/*/cancel", status=500, times=1)
    code, data = run_json(capsys, "cancel", "--batch-id", ids[0], "--batch-id", ids[1], "--conn-id", CONN)
    assert code == EXIT_FAILURE and data["cancelled"] == 1 and data["errors"] == 1
    assert data["batches"][0]["action"] == "error" and "InternalServerError" in data["batches"][0]["error"]


# -- cleanup -----------------------------------------------------------------------------------------------------


def test_cleanup_dry_run_then_for_real(conn, server, tmp_path, capsys) -> None:
    out = submit_run(tmp_path)
    server.wait_idle()
    client = OpenAIBatchHook(CONN).client
    foreign = client.files.create(file=("team.jsonl", io.BytesIO(b"{}\n"), "application/jsonl"), purpose="batch")
    ours = [f.id for f in client.files.list() if f.id != foreign.id]
    assert len(ours) == 6  # 3 uploads + 3 outputs
    batch_ids = json.loads((out / "manifest.json").read_text())["batch_ids"]
    server.age([*ours, foreign.id, *batch_ids], 3 * 86400)

    code, text, _ = run_cli(capsys, "cleanup", "--older-than", "2", "--dry-run", "--conn-id", CONN)
    assert code == EXIT_OK and server.counters["files_deleted"] == 0
    assert sum(line.startswith("would delete upload file") for line in text.splitlines()) == 3
    assert "would delete 6 file(s)" in text

    code, data = run_json(capsys, "cleanup", "--older-than", "2", "--conn-id", CONN)
    assert code == EXIT_OK and data["deleted"] == 6 and set(data["file_ids"]) == set(ours)
    assert {f.id for f in client.files.list()} == {foreign.id}
    assert server.counters["files_deleted"] == 6


def test_cleanup_default_connection_and_recent_files(monkeypatch, server, tmp_path, capsys) -> None:
    c = Connection(conn_id="synth_openai_default", conn_type="synth_openai", password=API_KEY,
                   host=server.base_url)
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", c.as_json())
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", c.as_json())
    submit_run(tmp_path)
    server.wait_idle()
    code, data = run_json(capsys, "cleanup", "--older-than", "1")
    assert code == EXIT_OK and data["deleted"] == 0 and data["kept_recent"] == 6
    assert data["conn_id"] == "synth_openai_default"


# -- errors and exit codes ---------------------------------------------------------------------------------------


def test_usage_errors_exit_2_without_traceback(conn, server, tmp_path, capsys) -> None:
    cases = [
        (["status"], "give a manifest"),
        (["status", str(tmp_path / "nope")], "no manifest and no run plan at"),
        (["cleanup"], "--older-than"),
        (["cleanup", "--older-than", "-3"], "days must be >= 0"),
        (["cleanup", "--older-than", "soon"], "not a number of days"),
        (["frobnicate"], "invalid choice"),
        (["status", "--batch-id", "b", "--conn-id", "no_such_conn"], "no_such_conn"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == EXIT_USAGE, (argv, err)
        assert message in err and "Traceback" not in err, (argv, err)
    out = submit_run(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    (tmp_path / "cortex.json").write_text(json.dumps({**manifest, "backend": "cortex"}))
    code, _, err = run_cli(capsys, "status", str(tmp_path / "cortex.json"))
    assert code == EXIT_USAGE and "backend 'cortex'" in err
    code, _, err = run_cli(capsys, "status", str(out), "--batch-id", "x")
    assert code == EXIT_USAGE and "not both" in err


def test_api_errors_exit_1_and_never_show_the_key(monkeypatch, server, capsys) -> None:
    wrong = "sk-WRONG-key-0123456789"
    c = Connection(conn_id="bad", conn_type="synth_openai", password=wrong, host=server.base_url,
                   extra=json.dumps({"max_retries": 0}))
    monkeypatch.setenv("AIRFLOW_CONN_BAD", c.as_json())
    code, out, err = run_cli(capsys, "cleanup", "--older-than", "1", "--conn-id", "bad")
    assert code == EXIT_FAILURE and "credentials" in err
    assert wrong not in err + out and API_KEY not in err + out
    code, _, err = run_cli(capsys, "status", "--batch-id", "batch_missing", "--conn-id", "bad")
    assert code == EXIT_FAILURE and wrong not in err


def test_unknown_batch_exits_1(conn, server, capsys) -> None:
    code, out, err = run_cli(capsys, "status", "--batch-id", "batch_nope", "--conn-id", CONN)
    assert code == EXIT_FAILURE and "NotFoundError" in err and out == ""


def test_help_explains_commands_examples_and_exit_codes(capsys) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == EXIT_OK
    for word in ("status", "download", "cancel", "cleanup", "examples:", "exit codes:", "AIRFLOW_CONN_"):
        assert word in out
    code, out, _ = run_cli(capsys, "cleanup", "--help")
    assert code == EXIT_OK and "--older-than DAYS" in out and "--dry-run" in out


# -- the installed console script -------------------------------------------------------------------------------


def test_console_script_end_to_end(conn, server, tmp_path) -> None:
    assert SCRIPT.exists(), "pip install -e . declares the airflow-synth script"
    out = submit_run(tmp_path)
    env = dict(os.environ)
    proc = subprocess.run([str(SCRIPT), "download", str(out), "--wait", "--poll-interval", "0.05", "--json", "-v"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # -v logs every API call, to stderr: stdout stays one JSON object
    assert "HTTP Request" in proc.stderr
    assert data["succeeded"] == 25 and (out / "results.jsonl").exists()
    assert API_KEY not in proc.stdout + proc.stderr
    proc = subprocess.run([str(SCRIPT), "status", "--batch-id", "batch_x"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "synth_openai_default" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_connection_from_the_metadata_database(airflow_db, server, capsys) -> None:
    from airflow.models import Connection as DbConnection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.add(DbConnection(conn_id="synth_cli_db", conn_type="synth_openai", password=API_KEY,
                                 host=server.base_url))
    try:
        code, out, err = run_cli(capsys, "--json", "cleanup", "--older-than", "1", "--conn-id", "synth_cli_db")
        data = json.loads(out)  # Airflow's warnings about the connection go to stderr, never into the JSON
        assert code == EXIT_OK and data["conn_id"] == "synth_cli_db" and data["deleted"] == 0
        assert "_AIRFLOW_PROCESS_CONTEXT" not in os.environ
    finally:
        with create_session() as session:
            session.query(DbConnection).filter(DbConnection.conn_id == "synth_cli_db").delete()


def test_azure_connection_status_and_cancel(monkeypatch, server, tmp_path, capsys) -> None:
    azure = Connection(conn_id="synth_cli_azure", conn_type="synth_azure_openai", password=API_KEY,
                       host=server.azure_endpoint, extra=json.dumps({"api_version": "2025-04-01-preview"}))
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_CLI_AZURE", azure.as_json())
    server.configure(in_progress_s=30)
    client = OpenAIBatchHook("synth_cli_azure").client
    lines = b"".join(orjson.dumps({"custom_id": f"a-{i}", "method": "POST", "url": "/chat/completions", "body": {
        "model": "my-deployment", "messages": [{"role": "user", "content": "hi"}]}}) + b"\n" for i in range(10))
    file = client.files.create(file=("in.jsonl", io.BytesIO(lines), "application/jsonl"), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/chat/completions", completion_window="24h")
    args = ("--conn-id", "synth_cli_azure", "--batch-id", batch.id)
    code, data = run_json(capsys, "status", *args)
    assert code == EXIT_OK and data["batches"][0]["request_counts"]["total"] == 10
    code, data = run_json(capsys, "cancel", *args)
    assert code == EXIT_OK and data["cancelled"] == 1
    assert server.counters["http_requests"].get("POST /v1/batches/{batch_id}/cancel", 0) + \
        server.counters["http_requests"].get("POST /openai/batches/{batch_id}/cancel", 0) == 1


def test_download_reports_the_cost_the_operator_reported_with_its_own_prices(conn, server, tmp_path, capsys) -> None:
    """One cost for one run: the operator's custom ``prices`` travel in the plan, so ``download`` prices the
    same answers the same way. Old main's CLI dropped them (a custom model came out "unknown")."""
    from types import SimpleNamespace

    from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator, RequestTemplate
    from airflow_provider_synth.runs.openai import OpenAIBatchConfig

    class TI(SimpleNamespace):
        def xcom_push(self, key, value):
            pass

    out = tmp_path / "out"
    op = OpenAIBatchOperator(task_id="t", requests=[{"id": f"r{i}", "topic": f"t{i}"} for i in range(6)],
                             model="acme-finetune-7", output_path=str(out), conn_id=CONN, deferrable=False,
                             poll_interval=0.05, template=RequestTemplate(prompt_template="About {topic}", id_field="id"),
                             config=OpenAIBatchConfig(prices={"acme-finetune-7": (3.0, 1.5, 12.0)}))
    manifest = op.execute({"ti": TI(dag_id="d", task_id="t", run_id="r", map_index=-1, try_number=1)})
    assert manifest["cost_usd"] is not None and manifest["cost_usd"] > 0
    capsys.readouterr()  # the operator's own output
    code, data = run_json(capsys, "download", str(out))
    assert code == EXIT_OK
    assert data["cost_usd"] == manifest["cost_usd"]
    assert data["usage"] == manifest["usage"]


# -- a run with no manifest yet, and counts over retry rounds (issue 21) ----------------------------------------
# The operator writes manifest.json when the run merges: while a run waits (hours) and after its task died
# before merging there is only the plan. On the old main status and cancel said "no manifest" and download
# refused the folder; status summed every round's batches (520/420/100 for a 400-request run).


def test_status_and_cancel_of_a_run_still_going_from_its_output_folder(conn, server, tmp_path, capsys) -> None:
    server.configure(in_progress_s=30)
    out = submit_run(tmp_path)
    (out / "manifest.json").unlink()  # as while the operator waits: it writes the manifest at the end
    code, data = run_json(capsys, "status", str(out))
    assert code == EXIT_OK and data["conn_id"] == CONN and data["total_requests"] == 25
    assert [(b["shard"], b["round"]) for b in data["batches"]] == [(0, 0), (1, 0), (2, 0)]
    assert data["totals"]["requests"]["total"] == 25 and data["totals"]["finished"] is False
    code, data = run_json(capsys, "status", str(out / "manifest.json"))  # the path a user may still give
    assert code == EXIT_OK and len(data["batches"]) == 3
    code, data = run_json(capsys, "cancel", str(out))
    assert code == EXIT_OK and data["cancelled"] == 3


def test_download_of_a_run_whose_task_died_before_merging(conn, server, tmp_path, capsys) -> None:
    out = submit_run(tmp_path)
    (out / "manifest.json").unlink()
    server.wait_idle()
    code, data = run_json(capsys, "download", str(out))
    assert code == EXIT_OK
    assert (data["total"], data["succeeded"], data["status"]) == (25, 25, "completed")
    assert json.loads((out / "manifest.json").read_text())["succeeded"] == 25
    assert len((out / "results.jsonl").read_bytes().splitlines()) == 25


def test_a_folder_with_neither_manifest_nor_plan_is_a_usage_error(conn, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "status", str(tmp_path))
    assert code == EXIT_USAGE and "no manifest and no run plan" in err and "_work/plan.json" in err


def test_status_counts_each_request_once_over_retry_rounds(conn, server, tmp_path, capsys) -> None:
    """3 requests fail for good (400), 5 fail once (500) and are answered in round 1: the run has 25 requests,
    22 answered and 3 failed, while its batches hold 30 requests and 30 answers and errors."""
    server.set_outcome("req-00[0-2]", Outcome.error(400, code="invalid_prompt"))
    server.set_outcome("req-01[0-4]", Outcome.error(500), times=1)
    out = submit_run(tmp_path)
    (out / "manifest.json").unlink()
    plan = Plan.load(out / "_work")
    server.wait_idle()
    run = BatchRun(OpenAIBatchHook(CONN), plan)
    run.discover()
    run.submit(run.next_round(1))  # round 1: the five 500s
    server.wait_idle()
    code, data = run_json(capsys, "status", str(out))
    assert code == EXIT_OK and data["totals"]["rounds"] == 2 and data["totals"]["batches"] == 4
    assert sum(b["request_counts"]["total"] for b in data["batches"]) == 30  # what the old main reported
    requests = data["totals"]["requests"]
    assert (requests["total"], requests["completed"], requests["failed"], requests["pending"]) == (25, 22, 3, 0)
    code, manifest = run_json(capsys, "download", str(out))
    assert (manifest["total"], manifest["succeeded"], manifest["failed"]) == (25, 22, 3)
    code, data = run_json(capsys, "status", str(out))  # now from the manifest
    requests = data["totals"]["requests"]
    assert (requests["total"], requests["completed"], requests["failed"], requests["source"]) == (
        25, 22, 3, "manifest")
    code, text, _ = run_cli(capsys, "status", str(out))
    assert "requests of the run (each counted once, from the manifest): 25 total, 22 answered, 3 failed" in text
