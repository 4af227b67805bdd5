"""The Cortex example DAGs under real Airflow ``dag.test()``: fakesnow for the warehouse (AI_COMPLETE emulated by
a DuckDB UDF), and a local SQL API on 127.0.0.1 for the deferrable path's status polls.

Each run gets a fresh interpreter and ``AIRFLOW_HOME`` (its own metadata database), through
``cortex_dag_runner.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("cortex_dag_runner.py")
SECRET = "pw-do-not-log-7f3a"


def run_dag(tmp_path: Path, dag_id: str, **config: Any) -> tuple[dict[str, Any], str]:
    home, out = tmp_path / "airflow", tmp_path / "out"
    home.mkdir()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": str(bool(config.get("deferrable"))),
        "SYNTH_OUTPUT_DIR": str(out),
    }
    if config.get("stored_connection"):
        # the runner's Airflow reads its configuration before `airflow connections add` writes a fernet key
        # to it: both processes must encrypt with the same key, as a deployment's processes do
        from cryptography.fernet import Fernet

        env["AIRFLOW__CORE__FERNET_KEY"] = Fernet.generate_key().decode()
    config = {"dag_file": str(ROOT / "example_dags" / f"{dag_id}.py"), "dag_id": dag_id, "secret": SECRET,
              **config}
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(config)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    *log_lines, summary = proc.stdout.strip().splitlines()
    return json.loads(summary), "\n".join(log_lines) + proc.stderr  # the summary line holds what the fake saw


def _lines(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_synthesis_dag_answers_every_request_and_reports_row_failures(tmp_path: Path):
    summary, logs = run_dag(tmp_path, "example_cortex_synthesis", fail_marker="rain jacket")
    assert summary["state"] == "success", summary
    assert {t: s["state"] for t, s in summary["tasks"].items()} == {
        "build_prompts": "success", "synthesize": "success", "report": "success"}
    assert len(summary["calls"]) == 8  # one model call per request
    (manifest,) = summary["manifests"]
    assert (manifest["backend"], manifest["total"], manifest["succeeded"], manifest["failed"]) == ("cortex", 8, 7, 1)
    assert len(manifest["query_ids"]) == 2  # 8 requests, chunk_size=4
    assert manifest["usage"]["total_tokens"] > 0 and manifest["run_id"] == summary["run_id"]
    results = _lines(manifest["results_path"])
    assert [r["custom_id"] for r in results] == [f"SKU-{i:04d}" for i in range(8) if i != 4]
    (failure,) = _lines(manifest["failures_path"])
    assert failure["custom_id"] == "SKU-0004" and failure["error"]["code"] == "cortex_error"
    assert summary["leftover_tables"] == []  # staging dropped after success
    assert SECRET not in logs and SECRET not in json.dumps(manifest)


def test_a_killed_run_resumes_and_pays_only_for_missing_rows(tmp_path: Path):
    # call 6 dies: chunk 0 (4 rows) is committed, chunk 1's statement is rolled back and the task fails
    summary, _ = run_dag(tmp_path, "example_cortex_synthesis", abort_after=5)
    assert summary["state"] == "success", summary
    assert summary["tasks"]["synthesize"]["try_number"] == 2
    (manifest,) = summary["manifests"]
    assert manifest["try_number"] == 2 and manifest["succeeded"] == 8
    calls = summary["calls"]
    assert len(calls) == 9  # 4 (chunk 0) + 1 (chunk 1, killed) + 4 (chunk 1 again); never chunk 0 twice
    first_chunk = [c for c in calls if any(p in c for p in ("hiking boots", "espresso", "noise-", "standing desk"))]
    assert len(first_chunk) == 4


def test_a_lost_record_is_found_again_and_nothing_is_answered_twice(tmp_path: Path):
    """Statements run in the background (as on Snowflake); the query id of chunk 0 is never recorded (the write
    fails once), so try 1 fails while that statement runs on. Try 2 finds it in its session's query history
    and submits only chunk 1."""
    record = r"^UPDATE .*_STATEMENTS\" SET QUERY_ID"
    summary, logs = run_dag(tmp_path, "example_cortex_synthesis", background=True,
                            fail_next=[[record, "simulated: the record failed"]])
    assert summary["state"] == "success", summary
    assert summary["tasks"]["synthesize"]["try_number"] == 2
    (manifest,) = summary["manifests"]
    assert (manifest["total"], manifest["succeeded"], manifest["answered_twice"]) == (8, 8, 0)
    assert len(summary["calls"]) == 8 and len(summary["chunk_statements"]) == 2  # each chunk paid once
    assert sorted(manifest["query_ids"]) == summary["chunk_statements"]
    assert "found in session" in logs


def test_deferrable_retry_finds_the_lost_statement_and_waits_for_the_real_ones(tmp_path: Path):
    """The same lost record on the deferrable path, the SQL API reporting the statements' real state."""
    record = r"^UPDATE .*_STATEMENTS\" SET QUERY_ID"
    summary, _ = run_dag(tmp_path, "example_cortex_synthesis", deferrable=True, background=True, running_polls=1,
                         fail_next=[[record, "simulated: the record failed"]])
    assert summary["state"] == "success", summary
    assert summary["tasks"]["synthesize"]["try_number"] == 2
    (manifest,) = summary["manifests"]
    assert manifest["succeeded"] == 8 and manifest["answered_twice"] == 0
    assert len(summary["calls"]) == 8 and len(summary["chunk_statements"]) == 2
    assert sorted(manifest["query_ids"]) == summary["chunk_statements"]
    # chunk 0's statement (found again) had finished before try 2 began: the trigger waited for chunk 1's only
    assert len(manifest["statements"]) == 1 and sorted(summary["polls"]) == sorted(manifest["statements"])
    assert all(s["state"] == "success" for s in manifest["statements"].values())


def test_deferrable_run_polls_the_sql_api_through_the_trigger(tmp_path: Path):
    summary, logs = run_dag(tmp_path, "example_cortex_synthesis", deferrable=True, running_polls=2)
    assert summary["state"] == "success", summary
    (manifest,) = summary["manifests"]
    assert manifest["succeeded"] == 8
    assert sorted(summary["polls"]) == sorted(manifest["query_ids"])
    assert all(n == 3 for n in summary["polls"].values())  # running, running, success
    assert summary["auth_headers"] == [f"Bearer {SECRET}"]  # PAT from the snowflake connection
    assert all(s["state"] == "success" for s in manifest["statements"].values())
    assert SECRET not in logs and SECRET not in json.dumps(manifest)


def test_deferrable_run_with_a_connection_added_by_the_cli(tmp_path: Path):
    """Issue 21: a connection in the metadata database (``airflow connections add``), not an environment
    variable: the in-process trigger of ``dag.test()`` must find it too (on the old main its async lookup
    ended in "The conn_id `snowflake_default` isn't defined" after the statements were submitted)."""
    summary, logs = run_dag(tmp_path, "example_cortex_synthesis", deferrable=True, running_polls=1,
                            stored_connection=True)
    assert summary["state"] == "success", logs[-3000:]
    (manifest,) = summary["manifests"]
    assert manifest["succeeded"] == 8
    assert sorted(summary["polls"]) == sorted(manifest["query_ids"])  # the trigger polled with that connection
    assert "isn't defined" not in logs
    assert SECRET not in logs and SECRET not in json.dumps(manifest)


def test_table_dag_runs_over_an_existing_table(tmp_path: Path):
    summary, _ = run_dag(tmp_path, "example_cortex_table", fail_marker="refund")
    assert summary["state"] == "success", summary
    (manifest,) = summary["manifests"]
    assert (manifest["total"], manifest["succeeded"], manifest["failed"]) == (5, 4, 1)
    assert len(manifest["query_ids"]) == 3  # 5 rows, chunk_size=2
    results = _lines(manifest["results_path"])
    assert [r["custom_id"] for r in results] == ["101", "102", "103", "104"]
    content = results[0]["response"]["body"]["choices"][0]["message"]["content"]
    assert json.loads(content)["answer"].startswith("Cortex answer to: My order arrived damaged")
    assert _lines(manifest["failures_path"])[0]["custom_id"] == "105"


@pytest.mark.parametrize("deferrable", [False, True])
def test_taskflow_cortex_decorator_answers_the_records_it_returns(tmp_path: Path, deferrable: bool):
    summary, logs = run_dag(tmp_path, "example_cortex_taskflow", fail_marker="rain jacket", deferrable=deferrable)
    assert summary["state"] == "success", summary
    assert {t: s["state"] for t, s in summary["tasks"].items()} == {"describe": "success", "report": "success"}
    (manifest,) = summary["manifests"]
    assert (manifest["backend"], manifest["total"], manifest["succeeded"], manifest["failed"]) == ("cortex", 8, 7, 1)
    assert [r["custom_id"] for r in _lines(manifest["results_path"])] == [f"SKU-{i:04d}" for i in range(8) if i != 4]
    requests = _lines(manifest["output_dir"] + "/_work/requests.jsonl")
    assert requests[1]["body"]["messages"] == [
        {"role": "user", "content": "Write a two-sentence product description for a espresso machine."}]
    assert len(summary["calls"]) == 8
    if deferrable:  # the resumed task found its run again from the request file in the output folder
        assert all(n == 3 for n in summary["polls"].values()) and len(summary["polls"]) == 2


@pytest.mark.parametrize("dry_run", [False, True])
def test_cleanup_dag_drops_old_staging_tables_of_finished_runs_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    dry_run: bool):
    if dry_run:
        monkeypatch.setenv("SYNTH_CLEANUP_DRY_RUN", "1")
    old, submitting, recent = "0123456789ABCDEF", "1111111111111111", "2222222222222222"
    staging_runs = [{"key": old, "run_id": "old", "age_days": 9},
                    {"key": submitting, "run_id": "submitting", "age_days": 9, "submitting": True},
                    {"key": recent, "run_id": "recent", "age_days": 2}]
    not_ours = ["CREATE TABLE SYNTH_CORTEX_3333333333333333_REQUESTS (X VARCHAR)",
                "CREATE TABLE SYNTH_CORTEX_NOTES (X VARCHAR) COMMENT = 'airflow-provider-synth cortex staging'"]
    summary, logs = run_dag(tmp_path, "example_cortex_cleanup", staging_runs=staging_runs, sql=not_ours,
                            xcom_tasks=["drop_old_staging_tables"])
    assert summary["state"] == "success", summary
    report = summary["xcoms"]["drop_old_staging_tables"]
    assert report["dry_run"] is dry_run and report["older_than_days"] == 7.0
    assert report["dropped"] == [f"SYNTH_CORTEX_{old}"]
    assert report["kept_running"] == [f"SYNTH_CORTEX_{submitting}"]
    assert report["kept_recent"] == [f"SYNTH_CORTEX_{recent}"] and report["errors"] == []
    assert {r["run_id"] for r in report["runs"]} == {"old", "submitting"}
    suffixes = ("REQUESTS", "RESULTS", "STATEMENTS")
    left = {f"SYNTH_CORTEX_{k}_{s}" for k in (submitting, recent) for s in suffixes}
    left |= {"SYNTH_CORTEX_3333333333333333_REQUESTS", "SYNTH_CORTEX_NOTES"}
    if dry_run:
        left |= {f"SYNTH_CORTEX_{old}_{s}" for s in suffixes}
    assert set(summary["tables"]) == left
    assert ("would drop" if dry_run else "dropped") + " the tables of 1 run(s)" in logs
    assert SECRET not in logs and SECRET not in json.dumps(report)


MAPPED = {"dag_file": str(ROOT / "example_dags" / "example_cortex_taskflow.py"), "poll_interval": 0.2}


def check_mapped_run(summary: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Three map indexes, each a Cortex run of its category's 4 products in its own folder, with its own
    staging tables and statements; the rain jacket (outdoor) fails in its own run. Returns the manifests."""
    assert summary["state"] == "success", summary
    assert {t: s["state"] for t, s in summary["tasks"].items()} == {
        "categories": "success", "describe_category[0]": "success", "describe_category[1]": "success",
        "describe_category[2]": "success", "report": "success"}
    manifests = sorted(summary["manifests"], key=lambda m: m["map_index"])
    assert [m["map_index"] for m in manifests] == [0, 1, 2]
    tags = summary["chunk_tags"]
    for category, m in zip(("outdoor", "kitchen", "office"), manifests, strict=True):
        ti = summary["tasks"][f"describe_category[{m['map_index']}]"]
        assert m == ti["xcom"] and m["try_number"] == ti["try_number"]  # the XCom is the manifest
        assert m["output_dir"] == str(out / "example_cortex_taskflow_mapped" / summary["run_id"]
                                      / str(m["map_index"]))
        skus = [f"{category}-{i:02d}" for i in range(4)]
        assert [r["custom_id"] for r in _lines(m["output_dir"] + "/_work/requests.jsonl")] == skus
        failed = ["outdoor-01"] if category == "outdoor" else []
        assert [r["custom_id"] for r in _lines(m["results_path"])] == [s for s in skus if s not in failed]
        assert [r["custom_id"] for r in _lines(m["failures_path"])] == failed
        assert (m["total"], m["succeeded"], m["failed"], m["answered_twice"]) == (
            4, 4 - len(failed), len(failed), 0)
        # its own statements, tagged with its map index and its own staging tables
        assert {tags[q]["map_index"] for q in m["query_ids"]} == {m["map_index"]}
    assert len({tags[q]["synth_run"] for m in manifests for q in m["query_ids"]}) == 3
    assert summary["leftover_tables"] == []  # each run dropped its own tables after success
    assert summary["tasks"]["report"]["xcom"] == {"total": 12, "succeeded": 11, "failed": 1, "runs": 3}
    return manifests


@pytest.mark.parametrize("deferrable", [False, True])
def test_mapped_cortex_decorator_runs_one_cortex_run_per_map_index(tmp_path: Path, deferrable: bool):
    summary, logs = run_dag(tmp_path, "example_cortex_taskflow_mapped", fail_marker="rain jacket",
                            deferrable=deferrable, **MAPPED)
    manifests = check_mapped_run(summary, tmp_path / "out")
    assert all(m["try_number"] == 1 and len(m["query_ids"]) == 2 for m in manifests)  # 4 requests, chunk_size=2
    assert sorted(q for m in manifests for q in m["query_ids"]) == summary["chunk_statements"]
    assert len(summary["calls"]) == 12  # one model call per request
    if deferrable:  # each resumed instance found its own run again from the request file in its folder
        assert sorted(summary["polls"]) == summary["chunk_statements"]
        assert all(n == 3 for n in summary["polls"].values())  # running, running, success
    assert SECRET not in logs


def test_a_killed_map_index_retries_alone_and_pays_only_for_its_missing_rows(tmp_path: Path):
    # call 7 dies: the second map index to run has its chunk 0 (2 rows) committed, its chunk 1 rolled back
    summary, _ = run_dag(tmp_path, "example_cortex_taskflow_mapped", fail_marker="rain jacket", abort_after=6,
                         **MAPPED)
    manifests = check_mapped_run(summary, tmp_path / "out")
    assert sorted(m["try_number"] for m in manifests) == [1, 1, 2]  # only the killed map index ran again
    # its chunk 0, its killed chunk 1 and chunk 1 again; the others' two chunks
    assert sorted(len(m["query_ids"]) for m in manifests) == [2, 2, 3]
    assert len(summary["calls"]) == 12  # 4 + 2 (its chunk 0) + 2 (its chunk 1, on try 2) + 4: none twice
