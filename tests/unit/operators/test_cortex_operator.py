"""CortexBatchOperator on fakesnow: validation before Snowflake, chunking, resume, defer, events, cancel."""

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

from airflow_provider_synth.batch.errors import InvalidRequestsError
from airflow_provider_synth.batch.merge import Accounting
from airflow_provider_synth.exceptions import BatchFailedError, BatchTimeoutError, TriggerEventError
from airflow_provider_synth.hooks.cortex import CortexHook
from airflow_provider_synth.operators.cortex import CortexBatchOperator
from airflow_provider_synth.runs.cortex import failure_message
from airflow_provider_synth.runs.cortex_sql import StagingTables, TableSource
from airflow_provider_synth.triggers.cortex import CortexStatementTrigger


def _context(try_number: int = 1, run_id: str = "run-1") -> dict[str, Any]:
    ti = SimpleNamespace(dag_id="dag", task_id="cortex", run_id=run_id, map_index=-1, try_number=try_number)
    return {"ti": ti}


def _write_requests(path: Path, prompts: list[str], model: str = "llama3.1-8b") -> Path:
    with path.open("w") as fp:
        for i, prompt in enumerate(prompts):
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.5}
            fp.write(json.dumps({"custom_id": f"r{i:03d}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}) + "\n")
    return path


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCortex]:
    payload = {"conn_type": "snowflake", "login": "u", "password": "secret-pw", "schema": "PUBLIC",
               "extra": {"account": "acct", "database": "SYNTH_DB", "warehouse": "WH"}}
    monkeypatch.setenv("AIRFLOW_CONN_SNOWFLAKE_DEFAULT", json.dumps(payload))
    with FakeCortex() as fc:
        yield fc


def _op(tmp_path: Path, **kwargs: Any) -> CortexBatchOperator:
    kwargs.setdefault("input_path", str(tmp_path / "requests.jsonl"))
    kwargs.setdefault("poll_interval", 0.05)  # the fake's statements end in milliseconds: no 10 s default wait
    return CortexBatchOperator(task_id="cortex", output_path=str(tmp_path / "out"), deferrable=False, **kwargs)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_arguments_are_checked_without_io():
    with pytest.raises(ValueError, match="exactly one"):
        CortexBatchOperator(task_id="t", output_path="o")
    with pytest.raises(ValueError, match="model is required"):
        CortexBatchOperator(task_id="t", output_path="o", source_table=TableSource("t", "id", prompt_column="p"))
    with pytest.raises(ValueError, match="chunk_size"):
        CortexBatchOperator(task_id="t", output_path="o", input_path="r", chunk_size=0)


def test_bad_input_fails_before_anything_runs_in_snowflake(fake: FakeCortex, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    path = _write_requests(tmp_path / "requests.jsonl", ["ok", "fine"])
    with path.open("a") as fp:
        fp.write(json.dumps({"custom_id": "r000", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "llama3.1-8b", "messages": [{"role": "tool", "content": "x"}]}}) + "\n")
    connects: list[int] = []
    monkeypatch.setattr(CortexHook, "get_conn", lambda self: connects.append(1))
    with pytest.raises(InvalidRequestsError) as err:
        _op(tmp_path).execute(_context())
    assert {(p.line, p.custom_id) for p in err.value.problems} >= {(3, "r000")}
    assert "duplicate custom_id" in str(err.value) and "role 'tool'" in str(err.value)
    _write_requests(path, ["ok"], model="gpt-4o-mini")
    with pytest.raises(InvalidRequestsError, match="not a Cortex model"):
        _op(tmp_path).execute(_context())
    assert connects == [] and fake.calls == []


def test_chunks_run_as_separate_statements_and_results_keep_input_order(fake: FakeCortex, tmp_path: Path):
    prompts = [f"prompt {i}" for i in range(10)]
    prompts[4] = "prompt 4 [fail]"
    _write_requests(tmp_path / "requests.jsonl", prompts)
    manifest = _op(tmp_path, chunk_size=3, max_failed_ratio=0.2).execute(_context())
    assert len(manifest["query_ids"]) == 4  # ceil(10 / 3)
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (10, 9, 1, 0)
    assert manifest["backend"] == "cortex" and manifest["try_number"] == 1 and manifest["model"] == "llama3.1-8b"
    assert manifest["usage"]["requests"] == 9 and manifest["usage"]["completion_tokens"] == 45
    assert sorted(fake.calls) == sorted(prompts)
    results = _lines(tmp_path / "out" / "results.jsonl")
    assert [r["custom_id"] for r in results] == [f"r{i:03d}" for i in range(10) if i != 4]
    assert results[0]["response"]["body"]["choices"][0]["message"]["content"] == "Cortex answer to: prompt 0"
    (failure,) = _lines(tmp_path / "out" / "failures.jsonl")
    assert failure["custom_id"] == "r004" and failure["error"]["code"] == "cortex_error"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["query_ids"] == manifest["query_ids"]
    # the staging tables are dropped after a successful run
    assert not [t for t in fake.query("SHOW TABLES") if "SYNTH_CORTEX" in str(t)]


def test_a_resumed_run_answers_only_the_missing_rows(fake: FakeCortex, tmp_path: Path):
    _write_requests(tmp_path / "requests.jsonl", [f"p{i}" for i in range(8)])
    fake.abort_after = 5  # the second chunk's statement dies half way: its rows roll back
    with pytest.raises(Exception, match="simulated kill"):
        _op(tmp_path, chunk_size=4).execute(_context(try_number=1))
    assert len(fake.calls) == 5
    fake.abort_after = None
    manifest = _op(tmp_path, chunk_size=4).execute(_context(try_number=2))
    assert manifest["succeeded"] == 8 and manifest["try_number"] == 2
    assert len(fake.calls) == 5 + 4  # chunk 0 (4 rows) was answered once, chunk 1 ran again
    # chunk 0 by try 1; chunk 1 by try 1 (it failed: found again in its session's query history) and by try 2
    assert len(manifest["query_ids"]) == 3


def test_too_many_failures_fail_the_task_and_keep_the_tables(fake: FakeCortex, tmp_path: Path):
    _write_requests(tmp_path / "requests.jsonl", ["a [fail]", "b", "c [fail]"])
    with pytest.raises(BatchFailedError, match="2 of 3 requests failed"):
        _op(tmp_path, max_failed_ratio=0.5).execute(_context())
    assert len(_lines(tmp_path / "out" / "failures.jsonl")) == 2
    assert [t for t in fake.query("SHOW TABLES") if "SYNTH_CORTEX" in str(t)]
    calls = len(fake.calls)
    with pytest.raises(BatchFailedError):  # a retry pays nothing again: every row has its answer or error
        _op(tmp_path, max_failed_ratio=0.5).execute(_context(try_number=2))
    assert len(fake.calls) == calls


def test_deferrable_defers_with_json_kwargs_and_an_absolute_deadline(fake: FakeCortex, tmp_path: Path):
    _write_requests(tmp_path / "requests.jsonl", ["a", "b", "c"])
    op = _op(tmp_path, chunk_size=2, timeout=600, poll_interval=5)
    op.deferrable = True
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(_context())
    trigger = deferred.value.trigger
    assert isinstance(trigger, CortexStatementTrigger)
    _, kwargs = trigger.serialize()
    assert kwargs["snowflake_conn_id"] == "snowflake_default" and len(kwargs["query_ids"]) == 2
    assert before + 600 <= kwargs["end_time"] <= time.time() + 600 and kwargs["poll_interval"] == 5
    assert json.loads(json.dumps(kwargs)) == kwargs and "secret-pw" not in json.dumps(kwargs)
    assert deferred.value.method_name == "execute_complete"
    run = deferred.value.kwargs["run"]
    assert json.loads(json.dumps(run)) == run

    statements = {q: {"query_id": q, "state": "success", "message": ""} for q in run["query_ids"]}
    manifest = op.execute_complete(_context(), {"status": "success", "message": "", "statements": statements}, run)
    assert manifest["succeeded"] == 3 and manifest["statements"] == statements
    assert manifest["query_ids"] == run["query_ids"]


def test_execute_complete_finds_the_run_again_without_defer_kwargs(fake: FakeCortex, tmp_path: Path):
    """Airflow 3.3's dag.test() resumes with the event only; the run is found from the input and Snowflake."""
    _write_requests(tmp_path / "requests.jsonl", ["a", "b", "c"])
    op = _op(tmp_path, chunk_size=2, keep_staging_tables=True)
    op.deferrable = True
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(_context())
    run = deferred.value.kwargs["run"]
    manifest = op.execute_complete(_context(), {"status": "success", "message": "", "statements": {}})
    assert manifest["succeeded"] == 3 and manifest["query_ids"] == run["query_ids"]
    assert manifest["staging_tables"]["requests"] == '"' + run["tables"]["prefix"] + '_REQUESTS"'


@pytest.mark.parametrize("event", [None, {}, {"status": "weird"}, {"status": "error", "message": "polling failed"}])
def test_execute_complete_refuses_bad_or_error_events(fake: FakeCortex, tmp_path: Path, event: Any):
    run = {"tables": {"database": None, "schema": None, "prefix": "X"}, "model": "llama3.1-8b", "total": 1,
           "query_ids": ["q"], "end_time": 0}
    with pytest.raises(TriggerEventError):
        _op(tmp_path).execute_complete(_context(), event, run)


def test_timeout_event_cancels_running_statements_and_keeps_partial_results(fake: FakeCortex, tmp_path: Path):
    _write_requests(tmp_path / "requests.jsonl", ["a", "b"])
    op = _op(tmp_path, chunk_size=1)
    op.deferrable = True
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(_context())
    run = deferred.value.kwargs["run"]
    q1, q2 = run["query_ids"]
    event = {"status": "timeout", "message": "Deadline passed",
             "statements": {q1: {"query_id": q1, "state": "success", "message": ""},
                            q2: {"query_id": q2, "state": "running", "message": ""}}}
    with pytest.raises(BatchTimeoutError, match="Deadline passed"):
        op.execute_complete(_context(), event, run)
    assert fake.cancelled == [q2]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["succeeded"] == 2


def test_a_retry_reattaches_to_a_statement_still_running(fake: FakeCortex, tmp_path: Path):
    _write_requests(tmp_path / "requests.jsonl", ["a", "b"])
    op = _op(tmp_path, chunk_size=1)
    op.deferrable = True
    fake.abort_after = 1  # chunk 1's statement "is still running": its rows are not answered yet
    with pytest.raises(Exception, match="simulated kill"):
        op.execute(_context())
    fake.abort_after = None
    (chunk0_qid,) = [r[0] for r in fake.query(f"SELECT QUERY_ID FROM {_statements_table(fake)} WHERE CHUNK = 0")]
    # pretend chunk 1 was submitted by try 1 and is still running
    fake.query(f"INSERT INTO {_statements_table(fake)} (CHUNK, QUERY_ID, TRY_NUMBER, SUBMITTED_AT) "
               "VALUES (1, 'q-still-running', 1, 1.0)")
    fake.statuses["q-still-running"] = "RUNNING"
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(_context(try_number=2))
    assert deferred.value.trigger.query_ids == ["q-still-running"] and chunk0_qid
    assert len(fake.calls) == 1
    # the deadline stays anchored at the run's first submission, whatever the try
    assert deferred.value.trigger.end_time == 1.0 + op.timeout


def _statements_table(fake: FakeCortex) -> str:
    names = [r for r in fake.query("SHOW TABLES") if "_STATEMENTS" in str(r)]
    return next(str(v) for v in names[0] if str(v).endswith("_STATEMENTS"))


def test_on_kill_cancels_the_statements_it_waits_for(fake: FakeCortex, tmp_path: Path):
    op = _op(tmp_path)
    run = op._new_run(_context())  # the run a worker-side wait holds (the lifecycle keeps it for on_kill)
    run.statements = {q: {"query_id": q, "state": "running", "message": ""} for q in ("q1", "q2")}
    op._run = run
    op.on_kill()
    assert fake.cancelled == ["q1", "q2"]


def test_source_table_is_checked_and_staged_in_snowflake(fake: FakeCortex, tmp_path: Path):
    fake.query("CREATE TABLE QUESTIONS (QID NUMBER, QUESTION VARCHAR)")
    fake.query("INSERT INTO QUESTIONS VALUES (2, 'why?'), (1, 'how?'), (3, 'what? [fail]')")
    source = TableSource("QUESTIONS", "qid", prompt_column="question", params={"temperature": 0.1})
    op = CortexBatchOperator(task_id="cortex", output_path=str(tmp_path / "out"), source_table=source, poll_interval=0.05,
                             model="mistral-large2", max_failed_ratio=0.5, deferrable=False)
    manifest = op.execute(_context())
    assert (manifest["total"], manifest["succeeded"], manifest["failed"]) == (3, 2, 1)
    assert [r["custom_id"] for r in _lines(tmp_path / "out" / "results.jsonl")] == ["1", "2"]
    fake.query("INSERT INTO QUESTIONS VALUES (1, 'again'), (NULL, 'no id'), (4, '')")
    calls = len(fake.calls)
    with pytest.raises(InvalidRequestsError) as err:
        op.execute(_context(run_id="run-2"))
    reasons = [p.reason for p in err.value.problems]
    assert "1 row(s) have a NULL id" in reasons and "1 row(s) have a NULL or empty prompt" in reasons
    assert any(p.custom_id == "1" for p in err.value.problems) and len(fake.calls) == calls


def test_not_deferrable_waits_then_cancels_at_the_deadline(fake: FakeCortex, tmp_path: Path):
    _write_requests(tmp_path / "requests.jsonl", ["a", "b", "c"])
    fake.default_status = "RUNNING"
    op = _op(tmp_path, chunk_size=2, timeout=0.6, poll_interval=0.1)
    with pytest.raises(BatchTimeoutError, match="still running at the deadline"):
        op.execute(_context())
    assert len(fake.cancelled) == 2 and sorted(fake.cancelled) == sorted(op._run.states())  # type: ignore[union-attr]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total"] == 3 and all(s["state"] == "running" for s in manifest["statements"].values())


def test_source_table_with_a_messages_column_uses_the_conversation_form(fake: FakeCortex, tmp_path: Path):
    fake.query("CREATE TABLE CHATS (ID VARCHAR, MESSAGES VARIANT)")
    fake.query("""INSERT INTO CHATS SELECT 'c1', PARSE_JSON('[{"role": "system", "content": "Be brief."}, """
               """{"role": "user", "content": "Name a colour."}]')""")
    fake.query("""INSERT INTO CHATS SELECT 'c2', PARSE_JSON('[{"role": "user", "content": "Name a fruit."}]')""")
    source = TableSource("CHATS", "id", messages_column="messages", params={"max_tokens": 20})
    op = CortexBatchOperator(task_id="cortex", output_path=str(tmp_path / "out"), source_table=source, poll_interval=0.05,
                             model="llama3.1-8b", deferrable=False)
    manifest = op.execute(_context())
    assert manifest["succeeded"] == 2
    assert sorted(fake.calls) == ["Be brief. | Name a colour.", "Name a fruit."]
    answers = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"]
               for r in _lines(tmp_path / "out" / "results.jsonl")}
    assert answers == {"c1": "Cortex answer to: Be brief. | Name a colour.", "c2": "Cortex answer to: Name a fruit."}


def test_output_checks_send_off_schema_answers_to_failures(fake: FakeCortex, tmp_path: Path):
    from airflow_provider_synth.batch.checks import OutputChecks

    _write_requests(tmp_path / "requests.jsonl", [f"prompt {i}" for i in range(5)])
    checks = OutputChecks(schema={"type": "object", "required": ["answer"]})
    manifest = _op(tmp_path, checks=checks, max_failed_ratio=1.0).execute(_context())
    assert (manifest["succeeded"], manifest["failed"]) == (0, 5)  # plain-text answers are not JSON objects
    assert manifest["checks"]["schema_invalid"] == 5 and manifest["error_codes"] == {"schema_invalid": 5}
    fails = _lines(tmp_path / "out" / "failures.jsonl")
    assert fails[0]["text"] == "Cortex answer to: prompt 0" and "not JSON" in fails[0]["error"]["message"]
    assert (tmp_path / "out" / "results.jsonl").read_bytes() == b""
    with pytest.raises(ValueError, match="direct_tail"):
        _op(tmp_path, checks=OutputChecks(direct_tail=3))


def test_failure_message_says_per_row_errors_are_final_and_a_retry_answers_only_missing_rows(
        fake: FakeCortex, tmp_path: Path):
    _write_requests(tmp_path / "requests.jsonl", ["a [fail]", "b", "c", "d"])
    with pytest.raises(BatchFailedError) as err:
        _op(tmp_path, chunk_size=2).execute(_context())
    message = str(err.value)
    assert ("1 got a per-row Cortex error (or an answer the output checks refused): these are final, a retry does "
            "not ask the model again") in message
    assert "have no answer" not in message and str(tmp_path / "out" / "failures.jsonl") in message
    assert "airflow-synth cortex-staging" in message
    acct = Accounting(total=10, succeeded=5, failed=2, missing=3, failures_written=5, results_written=5)
    message = failure_message(acct, 0.5, 0.1, "s3://b/out/failures.jsonl", StagingTables(None, None, "P_0"))
    assert message.startswith("5 of 10 requests failed or are missing (50.0% > max_failed_ratio 10.0%); see "
                              "s3://b/out/failures.jsonl.")
    assert "2 got a per-row Cortex error (or an answer the output checks refused): these are final" in message
    assert "3 have no answer (their statement failed or was cancelled): a retry answers only these" in message


def test_staging_tables_of_failed_runs_are_listed_and_dropped_per_run_and_only_ours(
        fake: FakeCortex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    from airflow_provider_synth.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
    from airflow_provider_synth.runs import cortex_staging

    _write_requests(tmp_path / "requests.jsonl", ["a [fail]", "b"])
    for run_id in ("run-1", "run-2"):
        with pytest.raises(BatchFailedError):
            _op(tmp_path).execute(_context(run_id=run_id))
    fake.query("CREATE TABLE SYNTH_CORTEX_0123456789ABCDEF_REQUESTS (X VARCHAR)")  # right name, not our comment
    fake.query("CREATE TABLE SYNTH_CORTEX_NOTES (X VARCHAR) COMMENT = 'airflow-provider-synth cortex staging'")

    capsys.readouterr()

    def cli(*args: str) -> tuple[int, dict[str, Any]]:
        code = main(["--json", "cortex-staging", *args])
        return code, json.loads(capsys.readouterr().out or "{}")

    code, listed = cli()
    assert code == EXIT_OK and len(listed["runs"]) == 2
    assert {r["run_id"] for r in listed["runs"]} == {"run-1", "run-2"}
    assert all(len(r["tables"]) == 3 and r["dag_id"] == "dag" for r in listed["runs"])
    code, _ = cli("--older-than", "1")
    assert code == EXIT_OK and _["runs"] == []  # created just now
    assert main(["cortex-staging", "--drop"]) == EXIT_USAGE

    first = next(r["prefix"] for r in listed["runs"] if r["run_id"] == "run-1")
    code, dry = cli("--run", first, "--drop", "--dry-run")
    assert code == EXIT_OK and dry["dropped"] == [first] and len(_synth_tables(fake)) == 8
    code, dropped = cli("--run", first, "--drop")
    assert code == EXIT_OK and dropped["dropped"] == [first]
    assert not [t for t in _synth_tables(fake) if t.startswith(first)] and len(_synth_tables(fake)) == 5
    code, missing = cli("--run", first)
    assert code == EXIT_FAILURE and missing["not_found"] == [first]

    now = time.time()
    monkeypatch.setattr(cortex_staging, "_now", lambda: now + 2 * 86400)
    code, old = cli("--older-than", "1", "--drop")
    assert code == EXIT_OK and len(old["dropped"]) == 1
    assert sorted(_synth_tables(fake)) == ["SYNTH_CORTEX_0123456789ABCDEF_REQUESTS", "SYNTH_CORTEX_NOTES"]


def test_a_run_whose_statement_may_still_run_is_not_dropped(fake: FakeCortex, tmp_path: Path):
    from airflow_provider_synth.runs.cortex_staging import drop_staging_runs, list_staging_runs

    _write_requests(tmp_path / "requests.jsonl", ["a", "b"])
    fake.default_status = "RUNNING"
    op = _op(tmp_path, timeout=0.2, poll_interval=0.05)
    op.deferrable = True
    with pytest.raises(TaskDeferred):
        op.execute(_context())
    hook = CortexHook()
    (run,) = list_staging_runs(hook)
    assert drop_staging_runs(hook, [run])["kept_running"] == [run.prefix] and len(_synth_tables(fake)) == 3
    fake.default_status = None
    assert drop_staging_runs(hook, [run])["dropped"] == [run.prefix] and _synth_tables(fake) == []
    hook.close()


def _synth_tables(fake: FakeCortex) -> list[str]:
    return [str(r[1]) for r in fake.query("SHOW TABLES") if str(r[1]).startswith("SYNTH_")]


def test_invalid_requests_skip_stages_only_the_valid_lines(fake: FakeCortex, tmp_path: Path):
    path = _write_requests(tmp_path / "requests.jsonl", [f"p{i}" for i in range(6)])
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"role": "user"', '"role": "robot"')
    lines[3] = lines[3].replace('"temperature": 0.5', '"temperature": 0.5, "tools": [{"type": "function"}]')
    lines.insert(4, "{broken")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidRequestsError, match="3 invalid request"):
        _op(tmp_path).execute(_context())
    assert fake.calls == []
    with pytest.raises(ValueError, match="invalid_requests"):
        _op(tmp_path, invalid_requests="ignore")
    manifest = _op(tmp_path, invalid_requests="skip", max_failed_ratio=0.5, chunk_size=2).execute(_context())
    assert sorted(fake.calls) == ["p0", "p2", "p4", "p5"]
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["invalid"]) == (7, 4, 3, 3)
    failures = _lines(tmp_path / "out" / "failures.jsonl")
    assert [(f["custom_id"], f["line"]) for f in failures] == [("r001", 2), ("r003", 4), ("line-5", 5)]
    assert [r["custom_id"] for r in _lines(tmp_path / "out" / "results.jsonl")] == ["r000", "r002", "r004", "r005"]
