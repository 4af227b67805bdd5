"""CortexBatchOperator against a fake Snowflake whose statements really run in the background.

Each statement runs in a thread of its own, on its own connection: it is RUNNING for status queries while it
runs, it outlives the worker (and the connection) that submitted it, and it is in its session's query
history. These are the failures between a submit and its record that fakesnow's synchronous
``execute_async`` could never show. Every test ends the same way: model calls == requests (plus the chunk a
test deliberately forces twice), every id exactly once in results or failures, and the run succeeded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import snowflake.connector
from airflow.exceptions import TaskDeferred
from fakes.cortex import FakeCortex, SimulatedKill

from airflow_provider_synth.exceptions import BatchFailedError, TriggerEventError
from airflow_provider_synth.hooks.cortex import CortexHook
from airflow_provider_synth.operators.cortex import CortexBatchOperator
from airflow_provider_synth.runs import cortex as runs_cortex
from airflow_provider_synth.runs.cortex_sql import StagingTables

N, CHUNK = 16, 4
PROMPTS = [f"prompt {i}" for i in range(N)]
IDS = [f"r{i:03d}" for i in range(N)]
RECORD = r"^UPDATE .*_STATEMENTS\" SET QUERY_ID"  # the query id written next to its intent, after the submit
INTENT = r"^INSERT INTO .*_STATEMENTS\""  # the intent, written before the submit
CHUNK_STATEMENT = r"^INSERT INTO .*_RESULTS\""


def _ctx(try_number: int = 1) -> Any:
    return {"ti": SimpleNamespace(dag_id="dag", task_id="cortex", run_id="run-1", map_index=-1,
                                  try_number=try_number)}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeCortex]:
    payload = {"conn_type": "snowflake", "login": "u", "password": "pw", "schema": "PUBLIC",
               "extra": {"account": "acct", "database": "SYNTH_DB", "warehouse": "WH"}}
    monkeypatch.setenv("AIRFLOW_CONN_SNOWFLAKE_DEFAULT", json.dumps(payload))
    with (tmp_path / "requests.jsonl").open("w") as fp:
        for cid, prompt in zip(IDS, PROMPTS, strict=True):
            fp.write(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "llama3.1-8b", "messages": [{"role": "user", "content": prompt}]}})
                     + "\n")
    with FakeCortex(background=True) as fc:
        yield fc


def _op(tmp_path: Path, deferrable: bool = False, **kwargs: Any) -> CortexBatchOperator:
    return CortexBatchOperator(task_id="cortex", input_path=str(tmp_path / "requests.jsonl"),
                               output_path=str(tmp_path / "out"), chunk_size=CHUNK, poll_interval=0.02,
                               deferrable=deferrable, **kwargs)


def _chunk_statements(fake: FakeCortex) -> list[str]:
    """Every chunk statement the account ever ran (what was paid for)."""
    return [q.query_id for q in fake.queries.values() if q.query_type == "INSERT" and "_RESULTS" in q.text]


def _defer(op: CortexBatchOperator, try_number: int) -> TaskDeferred:
    op.deferrable = True
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(_ctx(try_number))
    return deferred.value


def _complete(op: CortexBatchOperator, fake: FakeCortex, deferred: TaskDeferred, try_number: int) -> dict[str, Any]:
    """What the trigger would report once every statement finished, then the read-back."""
    fake.release()
    fake.wait_idle()
    qids = deferred.trigger.query_ids  # type: ignore[attr-defined]
    statements = {q: {"query_id": q, "state": "success" if fake.queries[q].status == "SUCCESS" else "error",
                      "message": ""} for q in qids}
    event = {"status": "success", "message": "", "statements": statements}
    return op.execute_complete(_ctx(try_number), event, deferred.kwargs["run"])  # type: ignore[index]


def _assert_landed(fake: FakeCortex, tmp_path: Path, manifest: dict[str, Any], extra_calls: int = 0) -> None:
    fake.wait_idle()
    assert fake.running() == []
    assert len(fake.calls) == N + extra_calls and set(fake.calls) == set(PROMPTS)
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (N, N, 0, 0)
    results = [json.loads(line)["custom_id"] for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert results == IDS  # every id exactly once, in input order
    assert (tmp_path / "out" / "failures.jsonl").read_text() == ""
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["succeeded"] == N


def _statements_rows(fake: FakeCortex) -> list[tuple[Any, ...]]:
    name = next(str(r[1]) for r in fake.query("SHOW TABLES") if str(r[1]).endswith("_STATEMENTS"))
    return fake.query(f'SELECT CHUNK, QUERY_ID, INTENT, SESSION_ID FROM "{name}" ORDER BY SUBMITTED_AT')


def test_the_background_fake_is_as_asynchronous_as_snowflake(fake: FakeCortex, tmp_path: Path):
    """A statement runs on after its connection closed, RUNNING for status polls and in the session history."""
    fake.hold()
    hook = CortexHook(query_tag='{"app": "test"}')
    fake.query("CREATE TABLE T (X VARCHAR)")
    qid = hook.submit(("INSERT INTO T SELECT TO_VARCHAR(AI_COMPLETE('llama3.1-8b', 'hello'))", ()),
                      query_tag='{"intent": "abc", "synth_run": "RUNX"}')
    session = hook.session_id
    hook.fetch_all(("SELECT 1", ()))  # the session's own tag is back after the tagged submit
    assert [q.query_tag for q in fake.queries.values() if q.session_id == session][-1] == '{"app": "test"}'
    hook.close()
    other = CortexHook()
    assert other.get_statement_status(qid).state == "running" and fake.running() == [qid]
    ((found, tag, status),) = other.find_statements(session, "RUNX")
    assert (found, json.loads(tag)["intent"], status.state) == (qid, "abc", "running")
    assert other.find_statements(session, "OTHER") == [] and other.find_statements("1", "RUNX") == []
    fake.release()
    fake.wait_idle()
    assert other.get_statement_status(qid).state == "success" and fake.query("SELECT COUNT(*) FROM T") == [(1,)]
    assert fake.queries[qid].query_tag == '{"intent": "abc", "synth_run": "RUNX"}'
    other.close()


def test_worker_killed_between_submit_and_record(fake: FakeCortex, tmp_path: Path):
    fake.hold()
    fake.fail_next(RECORD, SimulatedKill())  # the worker dies right after chunk 0's submit
    op = _op(tmp_path)
    with pytest.raises(SimulatedKill):
        op.execute(_ctx(1))
    (orphan,) = _chunk_statements(fake)
    assert fake.running() == [orphan]  # still running, outliving the dead worker's connection
    assert [(c, q) for c, q, _, _ in _statements_rows(fake)] == [(0, None)]  # an intent, no query id

    deferred = _defer(op, 2)  # the retry, while chunk 0's statement still runs
    assert deferred.trigger.query_ids[0] == orphan and len(deferred.trigger.query_ids) == 4  # type: ignore[attr-defined]
    assert len(_chunk_statements(fake)) == 4  # chunk 0 was NOT submitted again
    assert [(c, q) for c, q, _, _ in _statements_rows(fake)][0] == (0, orphan)  # found in its session's history
    manifest = _complete(op, fake, deferred, 2)
    _assert_landed(fake, tmp_path, manifest)
    assert manifest["answered_twice"] == 0 and manifest["query_ids"][0] == orphan


def test_worker_killed_then_a_retry_waits_in_the_worker_for_the_statement_it_found(fake: FakeCortex, tmp_path: Path):
    """The same kill, retried without deferring: the retry polls the found statement while it still runs."""
    fake.hold()
    fake.fail_next(RECORD, SimulatedKill())
    op = _op(tmp_path)
    with pytest.raises(SimulatedKill):
        op.execute(_ctx(1))
    (orphan,) = _chunk_statements(fake)
    outcome: dict[str, Any] = {}
    retry = threading.Thread(target=lambda: outcome.update(manifest=op.execute(_ctx(2))))
    retry.start()
    fake.wait_held(4)  # the orphan and the retry's three new statements, all running
    assert len(_chunk_statements(fake)) == 4 and retry.is_alive()  # the retry waits; chunk 0 not submitted again
    fake.release()
    retry.join(60)
    assert orphan in outcome["manifest"]["query_ids"]
    assert outcome["manifest"]["statements"][orphan]["state"] == "success"
    _assert_landed(fake, tmp_path, outcome["manifest"])


def test_killed_before_the_submit_reached_snowflake(fake: FakeCortex, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    clock = [1_800_000_000.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(runs_cortex, "_now", lambda: clock[0])
    monkeypatch.setattr(runs_cortex, "_sleep", sleep)
    fake.fail_next(CHUNK_STATEMENT, SimulatedKill())  # dies in the submit: the statement never reaches Snowflake
    op = _op(tmp_path)
    with pytest.raises(SimulatedKill):
        op.execute(_ctx(1))
    assert _chunk_statements(fake) == [] and fake.calls == []
    clock[0] += 30  # the retry comes 30 s later: the intent is not settled yet, so the retry waits, then submits
    manifest = op.execute(_ctx(2))
    assert slept and sum(slept) >= runs_cortex.SETTLE_S - 30 - 1
    assert len(_chunk_statements(fake)) == 4
    _assert_landed(fake, tmp_path, manifest)


def test_intent_insert_failing_once_submits_nothing(fake: FakeCortex, tmp_path: Path):
    fake.fail_next(INTENT, snowflake.connector.errors.ProgrammingError(msg="simulated: insert failed", errno=1))
    op = _op(tmp_path)
    with pytest.raises(snowflake.connector.errors.ProgrammingError):
        op.execute(_ctx(1))
    assert _chunk_statements(fake) == []  # no statement without its intent
    manifest = op.execute(_ctx(2))
    _assert_landed(fake, tmp_path, manifest)


def test_record_failing_once_the_retry_reattaches(fake: FakeCortex, tmp_path: Path):
    fake.hold()
    fake.fail_next(RECORD, snowflake.connector.errors.ProgrammingError(msg="simulated: update failed", errno=1))
    op = _op(tmp_path)
    with pytest.raises(snowflake.connector.errors.ProgrammingError):
        op.execute(_ctx(1))
    (orphan,) = _chunk_statements(fake)
    deferred = _defer(op, 2)
    assert orphan in deferred.trigger.query_ids and len(_chunk_statements(fake)) == 4  # type: ignore[attr-defined]
    _assert_landed(fake, tmp_path, _complete(op, fake, deferred, 2))


def test_status_polls_failing_are_waited_out(fake: FakeCortex, tmp_path: Path):
    fake.status_failures = runs_cortex.MAX_POLL_ERRORS  # a bad patch of network, then it answers again
    manifest = _op(tmp_path).execute(_ctx(1))
    assert fake.status_failures == 0
    _assert_landed(fake, tmp_path, manifest)


def test_status_polls_failing_for_good_fail_the_try_and_the_retry_reattaches(fake: FakeCortex, tmp_path: Path):
    fake.hold()
    fake.status_failures = 1_000
    op = _op(tmp_path)
    # one wait loop for every backend: too many transient polling errors in a row is a BatchFailedError that
    # names the count and the last error (the Cortex wait used to re-raise the connector's error itself)
    with pytest.raises(BatchFailedError, match=r"Polling failed \d+ times in a row.*connection reset"):
        op.execute(_ctx(1))
    submitted = _chunk_statements(fake)
    assert len(submitted) == 4 and sorted(fake.running()) == sorted(submitted)
    fake.status_failures = 0
    deferred = _defer(op, 2)
    assert sorted(deferred.trigger.query_ids) == sorted(submitted)  # type: ignore[attr-defined]
    assert _chunk_statements(fake) == submitted  # nothing submitted again
    _assert_landed(fake, tmp_path, _complete(op, fake, deferred, 2))


def test_trigger_polling_error_then_a_retry_reattaches(fake: FakeCortex, tmp_path: Path):
    fake.hold()
    op = _op(tmp_path)
    first = _defer(op, 1)
    with pytest.raises(TriggerEventError, match="a retry re-attaches"):
        op.execute_complete(_ctx(1), {"status": "error", "message": "SQL API unreachable", "statements": {}},
                            first.kwargs["run"])  # type: ignore[index]
    again = _defer(op, 2)
    assert again.trigger.query_ids == first.trigger.query_ids  # type: ignore[attr-defined]
    assert again.trigger.end_time == first.trigger.end_time  # type: ignore[attr-defined]
    assert len(_chunk_statements(fake)) == 4
    _assert_landed(fake, tmp_path, _complete(op, fake, again, 2))


def test_retry_while_statements_run(fake: FakeCortex, tmp_path: Path):
    """Try 1 deferred and was lost (worker, triggerer); try 2 starts while all of its statements still run."""
    fake.hold()
    op = _op(tmp_path)
    first = _defer(op, 1)
    assert len(fake.running()) == 4
    second = _defer(op, 2)
    assert second.trigger.query_ids == first.trigger.query_ids and len(_chunk_statements(fake)) == 4  # type: ignore[attr-defined]
    manifest = _complete(op, fake, second, 2)
    _assert_landed(fake, tmp_path, manifest)
    assert manifest["try_number"] == 2 and len(manifest["query_ids"]) == 4


def test_two_overlapping_statements_on_the_same_rows(fake: FakeCortex, tmp_path: Path):
    """A zombie worker's statement and the retry's answer the same chunk: one answer per id is kept."""
    fake.hold()
    op = _op(tmp_path)
    deferred = _defer(op, 1)
    tables = StagingTables(**deferred.kwargs["run"]["tables"])  # type: ignore[index]
    zombie = CortexHook()
    zombie.submit(tables.complete_chunk("llama3.1-8b", 0, CHUNK))  # both start before either wrote a row
    zombie.close()
    fake.wait_held(5)  # all five have read the results table: the zombie will answer chunk 0 again
    fake.release()
    fake.wait_idle()
    assert fake.query(f"SELECT COUNT(*) FROM {tables.results}") == [(N + CHUNK,)]  # chunk 0 answered twice
    manifest = _complete(op, fake, deferred, 1)
    _assert_landed(fake, tmp_path, manifest, extra_calls=CHUNK)  # the forced overlap paid for one chunk twice
    assert manifest["answered_twice"] == CHUNK


def test_cancel_at_the_deadline_rolls_the_statements_back(fake: FakeCortex, tmp_path: Path):
    """SYSTEM$CANCEL_QUERY aborts a running statement: its rows are missing, and a retry answers them."""
    fake.hold()
    op = _op(tmp_path)
    deferred = _defer(op, 1)
    qids = deferred.trigger.query_ids  # type: ignore[attr-defined]
    event = {"status": "timeout", "message": "Deadline passed",
             "statements": {q: {"query_id": q, "state": "running", "message": ""} for q in qids}}
    with pytest.raises(Exception, match="Deadline passed"):
        op.execute_complete(_ctx(1), event, deferred.kwargs["run"])  # type: ignore[index]
    fake.wait_idle()
    assert {fake.queries[q].status for q in qids} == {"ABORTED"} and fake.calls == []
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["missing"] == N
    fake.release()
    op.timeout = 3600  # a new budget: the retry answers only what is missing
    manifest = _complete(op, fake, _defer(op, 2), 2)
    _assert_landed(fake, tmp_path, manifest)


def test_a_fatal_status_error_ends_the_worker_wait_at_once(fake: FakeCortex, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """The hook classifies its own errors: a revoked grant (ProgrammingError) is not waited out five times as
    old main did (it treated every exception as transient); the wait fails at the first such poll."""
    fake.hold()
    polls: list[str] = []

    def denied(self: object, query_id: str) -> object:
        polls.append(query_id)
        raise snowflake.connector.errors.ProgrammingError(msg="simulated: insufficient privileges", errno=3001)

    slept: list[float] = []
    monkeypatch.setattr(runs_cortex, "_sleep", slept.append)
    monkeypatch.setattr("airflow_provider_synth.hooks.cortex.CortexHook.get_statement_status", denied)
    with pytest.raises(snowflake.connector.errors.ProgrammingError):
        _op(tmp_path).execute(_ctx(1))
    assert slept == [] and len(polls) == 1


def test_read_back_interrupted_half_way_lands_nothing_and_the_retry_reads_again(fake: FakeCortex, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    """The connection drops after 6 of 16 rows were read back (two blocks already merged): no results.jsonl
    that looks complete is left, no manifest; the retry reads the answers again from the staging table and
    pays for no model call twice."""
    monkeypatch.setattr(runs_cortex, "READ_BLOCK_ROWS", 3)
    real = CortexHook.iter_rows

    def dropping(self: CortexHook, statement: Any) -> Iterator[Any]:
        for i, row in enumerate(real(self, statement)):
            if i == 6:
                raise snowflake.connector.errors.OperationalError("connection reset by peer")
            yield row

    monkeypatch.setattr(CortexHook, "iter_rows", dropping)
    with pytest.raises(snowflake.connector.errors.OperationalError):
        _op(tmp_path).execute(_ctx(1))
    out = tmp_path / "out"
    assert not (out / "results.jsonl").exists() and not (out / "manifest.json").exists()
    assert not list(out.glob(".results.jsonl.partial-*"))
    monkeypatch.setattr(CortexHook, "iter_rows", real)
    manifest = _op(tmp_path).execute(_ctx(2))
    _assert_landed(fake, tmp_path, manifest)
    assert len(_chunk_statements(fake)) == N // CHUNK  # the retry ran no chunk again
