"""CortexStagingCleanupOperator on fakesnow, through the snowflake provider's hook: the staging tables of real
CortexBatchOperator runs (failed ones, a running one, a recent one) next to tables that are not ours."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.exceptions import TaskDeferred
from fakes.cortex import FakeCortex

from airflow_provider_synth.exceptions import BatchFailedError, SynthError
from airflow_provider_synth.operators.cortex import CortexBatchOperator, CortexStagingCleanupOperator
from airflow_provider_synth.runs import cortex as cortex_runs

SECRET = "pw-cleanup-SECRET-8642"
DAY = 86400.0
#: our comment, a name of our shape but another comment, no comment, our comment on names of another shape
NOT_OURS = {
    "SYNTH_CORTEX_0123456789ABCDEF_REQUESTS": "",
    "SYNTH_CORTEX_FEDCBA9876543210_RESULTS": " COMMENT = 'search team: product catalogue'",
    "SYNTH_CORTEX_NOTES": " COMMENT = 'airflow-provider-synth cortex staging {\"created_at\": 0}'",
    "SYNTH_CORTEX_0123456789ABCDEF_REQUESTS_OLD": " COMMENT = 'airflow-provider-synth cortex staging {\"created_at\": 0}'",
}


def _context(run_id: str) -> dict[str, Any]:
    return {"ti": SimpleNamespace(dag_id="dag", task_id="cortex", run_id=run_id, map_index=-1, try_number=1)}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCortex]:
    payload = {"conn_type": "snowflake", "login": "u", "password": SECRET, "schema": "PUBLIC",
               "extra": {"account": "acct", "database": "SYNTH_DB", "warehouse": "WH"}}
    monkeypatch.setenv("AIRFLOW_CONN_SNOWFLAKE_DEFAULT", json.dumps(payload))
    with FakeCortex(background=True) as fc:
        yield fc
        fc.release()
        fc.wait_idle()


def _tables(fake: FakeCortex) -> set[str]:
    return {str(r[1]) for r in fake.query("SHOW TABLES") if str(r[1]).startswith("SYNTH_")}


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_id: str, *, age_days: float,
         running: bool = False) -> None:
    """A real CortexBatchOperator run, ``age_days`` old: failed (its tables kept), or still running."""
    monkeypatch.setattr(cortex_runs, "_now", lambda: time.time() - age_days * DAY)
    path = tmp_path / f"{run_id}.jsonl"
    with path.open("w") as fp:
        for i, prompt in enumerate(["a [fail]", "b"]):
            fp.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "llama3.1-8b", "messages": [{"role": "user", "content": prompt}]}})
                     + "\n")
    # a run's deadline counts from its first submission (age_days ago): give it room to be still running now
    op = CortexBatchOperator(task_id="cortex", input_path=str(path), output_path=str(tmp_path / run_id),
                             deferrable=running, poll_interval=0.05, timeout=(age_days + 1) * DAY)
    with pytest.raises(TaskDeferred if running else BatchFailedError):
        op.execute(_context(run_id))  # type: ignore[arg-type]
    monkeypatch.setattr(cortex_runs, "_now", time.time)


def _prefix(fake: FakeCortex, run_id: str) -> str:
    """The table prefix of a run, found by the run_id its comment names."""
    rows = fake.query("SELECT TABLE_NAME, COMMENT FROM INFORMATION_SCHEMA.TABLES")
    (prefix,) = {str(name).rsplit("_", 1)[0] for name, comment in rows if f'"run_id": "{run_id}"' in str(comment)}
    return prefix


@pytest.fixture
def account(fake: FakeCortex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Two failed runs 10 days old, one failed yesterday, one 10 days old still running, and tables not ours."""
    for run_id, age in (("run-old-1", 10), ("run-old-2", 10), ("run-recent", 1)):
        _run(tmp_path, monkeypatch, run_id, age_days=age)
    fake.hold()  # its statements stay running
    _run(tmp_path, monkeypatch, "run-running", age_days=10, running=True)
    fake.wait_held(1)
    for name, comment in NOT_OURS.items():
        fake.query(f"CREATE TABLE {name} (X VARCHAR){comment}")
    prefixes = {run_id: _prefix(fake, run_id) for run_id in ("run-old-1", "run-old-2", "run-recent", "run-running")}
    assert len(_tables(fake)) == 4 * 3 + len(NOT_OURS)
    return prefixes


def _clean(**kwargs: Any) -> dict[str, Any]:
    op = CortexStagingCleanupOperator(task_id="cleanup", **kwargs)
    report = op.execute({})  # type: ignore[arg-type]
    assert json.loads(json.dumps(report)) == report and SECRET not in json.dumps(report)
    return report


def test_drops_old_finished_runs_only(fake: FakeCortex, account: dict[str, str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    before = _tables(fake)
    capsys.readouterr()
    report = _clean(older_than_days=7)
    logs = capsys.readouterr().out
    old = {account["run-old-1"], account["run-old-2"]}
    assert set(report["dropped"]) == old and len(report["dropped"]) == 2
    assert report["kept_running"] == [account["run-running"]]
    assert report["kept_recent"] == [account["run-recent"]]
    assert (report["not_found"], report["errors"], report["dry_run"]) == ([], [], False)
    assert {r["prefix"] for r in report["runs"]} == old | {account["run-running"]}
    assert {r["run_id"] for r in report["runs"]} == {"run-old-1", "run-old-2", "run-running"}
    assert all(r["dag_id"] == "dag" and len(r["tables"]) == 3 for r in report["runs"])
    assert report["snowflake_conn_id"] == "snowflake_default" and report["older_than_days"] == 7.0
    assert before - _tables(fake) == {f"{p}_{s}" for p in old for s in ("REQUESTS", "RESULTS", "STATEMENTS")}
    assert set(NOT_OURS) <= _tables(fake)
    assert "dropped the tables of 2 run(s)" in logs and "left out 1 run(s) created less than 7 day(s) ago" in logs
    assert f"kept {account['run-running']}: a statement of the run may still be running" in logs
    assert SECRET not in logs
    # the running run is dropped once it finished; the recent one stays until it is old enough
    fake.release()
    fake.wait_idle()
    again = _clean(older_than_days=7)
    assert again["dropped"] == [account["run-running"]] and again["kept_recent"] == [account["run-recent"]]
    assert _tables(fake) == {f"{account['run-recent']}_{s}" for s in ("REQUESTS", "RESULTS", "STATEMENTS")} | set(
        NOT_OURS)


def test_dry_run_drops_nothing_and_reports_the_same(fake: FakeCortex, account: dict[str, str]) -> None:
    before = _tables(fake)
    report = _clean(older_than_days=7, dry_run=True)
    assert _tables(fake) == before
    assert report["dry_run"] is True
    assert set(report["dropped"]) == {account["run-old-1"], account["run-old-2"]}
    assert report["kept_running"] == [account["run-running"]] and report["kept_recent"] == [account["run-recent"]]


def test_the_age_limit_is_respected(fake: FakeCortex, account: dict[str, str]) -> None:
    before = _tables(fake)
    report = _clean(older_than_days=30)  # every run is younger
    assert _tables(fake) == before and report["runs"] == [] and report["dropped"] == []
    assert sorted(report["kept_recent"]) == sorted(account.values())
    report = _clean(older_than_days=0.5)  # the recent run is a day old
    assert set(report["dropped"]) == {account["run-old-1"], account["run-old-2"], account["run-recent"]}
    assert report["kept_running"] == [account["run-running"]] and report["kept_recent"] == []
    assert _tables(fake) == {f"{account['run-running']}_{s}" for s in ("REQUESTS", "RESULTS", "STATEMENTS")} | set(
        NOT_OURS)


def test_one_run_by_its_prefix(fake: FakeCortex, account: dict[str, str]) -> None:
    prefix = account["run-recent"]
    report = _clean(run_prefix=prefix)  # whatever its age
    assert report["dropped"] == [prefix] and [r["prefix"] for r in report["runs"]] == [prefix]
    assert not {t for t in _tables(fake) if t.startswith(prefix)} and len(_tables(fake)) == 3 * 3 + len(NOT_OURS)
    # again (a retried task): nothing left to drop is not a failure
    again = _clean(run_prefix=prefix)
    assert again["not_found"] == [prefix] and again["dropped"] == [] and again["errors"] == []
    # a run's prefix and an age: both apply
    report = _clean(run_prefix=account["run-old-1"].lower(), older_than_days=30)
    assert report["kept_recent"] == [account["run-old-1"]] and report["dropped"] == [] and report["not_found"] == []
    assert _clean(run_prefix=account["run-running"])["kept_running"] == [account["run-running"]]


def test_database_and_schema_narrow_the_search(fake: FakeCortex, account: dict[str, str]) -> None:
    before = _tables(fake)
    report = _clean(older_than_days=7, schema="ELSEWHERE")
    assert report["runs"] == [] and _tables(fake) == before and report["schema"] == "ELSEWHERE"
    report = _clean(older_than_days=7, database="SYNTH_DB", schema="PUBLIC", dry_run=True)
    assert set(report["dropped"]) == {account["run-old-1"], account["run-old-2"]}
    assert {r["schema"] for r in report["runs"]} == {"PUBLIC"}


def test_a_table_of_a_run_without_our_comment_is_never_dropped(fake: FakeCortex, account: dict[str, str]) -> None:
    prefix = account["run-old-1"]
    fake.query(f"DROP TABLE {prefix}_RESULTS")
    fake.query(f"CREATE TABLE {prefix}_RESULTS (X VARCHAR) COMMENT = 'search team'")  # somebody else's table
    report = _clean(run_prefix=prefix)
    assert report["dropped"] == [prefix] and report["runs"][0]["tables"] == [f"{prefix}_REQUESTS",
                                                                              f"{prefix}_STATEMENTS"]
    assert {t for t in _tables(fake) if t.startswith(prefix)} == {f"{prefix}_RESULTS"}


def test_a_failed_drop_fails_the_task_after_dropping_the_others(fake: FakeCortex, account: dict[str, str]) -> None:
    from snowflake.connector.errors import ProgrammingError

    stuck = account["run-old-1"]
    fake.fail_next(rf"^DROP TABLE IF EXISTS .*{stuck}_REQUESTS", ProgrammingError(msg="insufficient privileges",
                                                                                     errno=3001))
    op = CortexStagingCleanupOperator(task_id="cleanup", older_than_days=7)
    with pytest.raises(SynthError, match=rf"could not drop the tables of 1 run\(s\) \({stuck}: .*insufficient "
                                         rf"privileges\); those of 1 other\(s\) were dropped") as err:
        op.execute({})  # type: ignore[arg-type]
    assert SECRET not in str(err.value)
    assert not {t for t in _tables(fake) if t.startswith(account["run-old-2"])}
    assert {f"{stuck}_REQUESTS", f"{stuck}_RESULTS", f"{stuck}_STATEMENTS"} <= _tables(fake)
    assert _clean(older_than_days=7)["dropped"] == [stuck]  # the next run finishes the job


@pytest.mark.parametrize("kwargs", [{}, {"older_than_days": -1}, {"older_than_days": "7"},
                                    {"older_than_days": True}, {"older_than_days": float("nan")},
                                    {"run_prefix": ""}])
def test_arguments_are_checked_without_io(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="older_than_days"):
        CortexStagingCleanupOperator(task_id="c", **kwargs)


def test_templated_fields() -> None:
    op = CortexStagingCleanupOperator(task_id="c", older_than_days=1)
    assert set(op.template_fields) == {"snowflake_conn_id", "database", "schema", "run_prefix"}
    assert op.is_dry_run is False and op.table_prefix == "SYNTH_CORTEX"
