"""CortexStatementTrigger against a local SQL API on 127.0.0.1: one terminal event, absolute deadline, cancel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fakes.cortex import FakeSqlApi

from airflow_provider_synth.triggers import base as trigger_base
from airflow_provider_synth.triggers.cortex import CortexStatementTrigger

PAT = "pat-trigger-secret"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSqlApi]:
    server = FakeSqlApi(running_polls=2, errors={"q-err": "Cortex statement failed"})
    with server.serve():
        payload = {"conn_type": "snowflake", "login": "u", "password": PAT, "schema": "PUBLIC",
                   "extra": {"account": "acct", "host": "127.0.0.1", "port": server.port, "protocol": "http",
                             "authenticator": "programmatic_access_token"}}
        monkeypatch.setenv("AIRFLOW_CONN_SF_TRIG", json.dumps(payload))
        yield server


async def _events(trigger: CortexStatementTrigger) -> list[dict[str, Any]]:
    return [event.payload async for event in trigger.run()]


def test_serialize_round_trip_is_json_primitives():
    trigger = CortexStatementTrigger("sf", ["q1", "q2"], poll_interval=3, end_time=1_900_000_000.5)
    path, kwargs = trigger.serialize()
    assert path == "airflow_provider_synth.triggers.cortex.CortexStatementTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs
    again = CortexStatementTrigger(**kwargs)
    assert again.serialize() == (path, kwargs)
    with pytest.raises(ValueError):
        CortexStatementTrigger("sf", [])


async def test_one_terminal_event_after_running_polls(api: FakeSqlApi):
    events = await _events(CortexStatementTrigger("sf_trig", ["q-a", "q-b"], poll_interval=0.01))
    assert len(events) == 1
    event = events[0]
    assert event["status"] == "success" and "all succeeded" in event["message"]
    assert {q: s["state"] for q, s in event["statements"].items()} == {"q-a": "success", "q-b": "success"}
    assert api.polls == {"q-a": 3, "q-b": 3}
    assert set(api.auth_headers) == {f"Bearer {PAT}"} and PAT not in json.dumps(event)


async def test_failed_statement_is_reported_per_statement(api: FakeSqlApi):
    (event,) = await _events(CortexStatementTrigger("sf_trig", ["q-ok", "q-err"], poll_interval=0.01))
    assert event["status"] == "success" and "1 failed: q-err" in event["message"]
    assert event["statements"]["q-err"]["state"] == "error"
    assert "Cortex statement failed" in event["statements"]["q-err"]["message"]


async def test_deadline_is_absolute_and_survives_recreation(api: FakeSqlApi, monkeypatch: pytest.MonkeyPatch):
    api.running_polls = 10**6
    clock = {"now": 1_000.0}
    monkeypatch.setattr(trigger_base, "_now", lambda: clock["now"])
    trigger = CortexStatementTrigger("sf_trig", ["q-slow"], poll_interval=0.01, end_time=1_000.5)
    recreated = CortexStatementTrigger(**trigger.serialize()[1])
    assert recreated.end_time == 1_000.5
    clock["now"] = 1_001.0  # a triggerer restart later: the budget is not extended
    (event,) = await _events(recreated)
    assert event["status"] == "timeout" and "q-slow" in event["message"]
    assert api.polls["q-slow"] == 1


async def test_an_answer_about_no_statement_ends_the_wait_as_a_polling_error(api: FakeSqlApi,
                                                                              monkeypatch: pytest.MonkeyPatch):
    """A 404 says nothing about the statement: the verdict stops on a fatal polling error (old main made it a
    failed statement and reported success)."""
    async def not_found(self: Any, query_id: str) -> Any:
        from airflow_provider_synth.hooks.cortex import status_from_sql_api

        return status_from_sql_api(query_id, 404, {"message": "Statement not found"})

    monkeypatch.setattr("airflow_provider_synth.hooks.cortex.CortexAsyncHook.poll_statement", not_found)
    (event,) = await _events(CortexStatementTrigger("sf_trig", ["q-x"], poll_interval=0.01))
    assert event["status"] == "error" and "HTTP 404: Statement not found" in event["message"]
    assert event["statements"]["q-x"]["state"] == "running"


async def test_throttled_polls_count_against_max_consecutive_errors(api: FakeSqlApi,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """429 is a transient polling error, counted: old main took it for "still running" and waited forever."""
    async def throttled(self: Any, query_id: str) -> Any:
        from airflow_provider_synth.hooks.cortex import status_from_sql_api

        return status_from_sql_api(query_id, 429, {"message": "Too many requests"})

    monkeypatch.setattr("airflow_provider_synth.hooks.cortex.CortexAsyncHook.poll_statement", throttled)
    events = await _events(CortexStatementTrigger("sf_trig", ["q"], poll_interval=0.001, max_consecutive_errors=2))
    assert len(events) == 1 and events[0]["status"] == "error" and "3 times in a row" in events[0]["message"]


async def test_transient_polling_errors_then_give_up(api: FakeSqlApi, monkeypatch: pytest.MonkeyPatch):
    async def broken(self: Any, query_id: str) -> Any:
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr("airflow_provider_synth.hooks.cortex.CortexAsyncHook.poll_statement", broken)
    events = await _events(CortexStatementTrigger("sf_trig", ["q"], poll_interval=0.001, max_consecutive_errors=2))
    assert len(events) == 1 and events[0]["status"] == "error" and "3 times in a row" in events[0]["message"]


async def test_non_transient_polling_error_ends_at_once(api: FakeSqlApi, monkeypatch: pytest.MonkeyPatch):
    async def bad(self: Any, query_id: str) -> Any:
        raise ValueError("Snowflake REST API authentication requires a private key")

    monkeypatch.setattr("airflow_provider_synth.hooks.cortex.CortexAsyncHook.poll_statement", bad)
    (event,) = await _events(CortexStatementTrigger("sf_trig", ["q"], poll_interval=0.001))
    assert event["status"] == "error" and "ValueError" in event["message"]


async def test_on_kill_cancels_what_still_runs(api: FakeSqlApi):
    api.running_polls = 10**6
    trigger = CortexStatementTrigger("sf_trig", ["q-1", "q-2"], poll_interval=0.01)
    task = asyncio.create_task(_events(trigger))
    while not all(api.polls.get(q) for q in ("q-1", "q-2")):  # a condition, not a guessed duration
        assert not task.done()
        await asyncio.sleep(0.005)
    task.cancel()
    await trigger.on_kill()
    assert sorted(api.cancelled) == ["q-1", "q-2"]


async def test_on_kill_gives_up_on_a_cancel_that_hangs(api: FakeSqlApi, monkeypatch: pytest.MonkeyPatch,
                                                       capfd: pytest.CaptureFixture[str]):
    never = asyncio.Event()

    async def hang(self: Any, query_id: str) -> Any:
        await never.wait()

    monkeypatch.setattr("airflow_provider_synth.hooks.cortex.CortexAsyncHook.acancel_statement", hang)
    monkeypatch.setattr(CortexStatementTrigger, "cancel_timeout", 0.01)
    trigger = CortexStatementTrigger("sf_trig", ["q-1", "q-2"], poll_interval=0.01)
    await trigger.on_kill()  # returns (the kill goes on) instead of raising TimeoutError
    assert "may still be running: q-1, q-2" in "".join(capfd.readouterr())


async def test_the_event_loop_is_never_blocked(api: FakeSqlApi):
    """Time every step of the loop while the trigger runs: nothing may hold it for long (asyncio debug).

    A first run warms up what a long-lived triggerer does once per process (lazy imports in Airflow's
    connection lookup); the measured run is a new trigger with a new hook."""
    await _events(CortexStatementTrigger("sf_trig", ["q-warm"], poll_interval=0.01))
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.25  # generous: the machine running the tests may be busy
    slow: list[str] = []
    handler = loop.get_exception_handler()
    import logging

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Executing" in record.getMessage():
                slow.append(record.getMessage())

    catcher = Catch()
    logging.getLogger("asyncio").addHandler(catcher)
    try:
        await _events(CortexStatementTrigger("sf_trig", ["q-a", "q-b", "q-c"], poll_interval=0.01))
    finally:
        logging.getLogger("asyncio").removeHandler(catcher)
        loop.set_exception_handler(handler)
        loop.set_debug(False)
    assert slow == []


async def test_blocking_work_runs_off_the_loop_and_no_sync_lookup(api: FakeSqlApi, monkeypatch: pytest.MonkeyPatch):
    """Deterministic companion of the timing test: token building (JWT signing, OAuth refresh) and connection
    parameters run in worker threads; the sync connection lookup and the connector are never used."""
    import threading

    from airflow.providers.snowflake.hooks.snowflake import SnowflakeHook
    from airflow.providers.snowflake.hooks.sql_api import SnowflakeSqlApiHook

    from airflow_provider_synth.hooks.cortex import CortexHook

    loop_thread = threading.get_ident()
    threads: list[int] = []
    build, params = SnowflakeSqlApiHook.get_headers, SnowflakeHook._get_conn_params

    def spy_build(self: Any) -> Any:
        threads.append(threading.get_ident())
        return build(self)

    def spy_params(self: Any) -> Any:
        threads.append(threading.get_ident())
        return params(self)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("blocking call from the trigger")

    monkeypatch.setattr(SnowflakeSqlApiHook, "get_headers", spy_build)
    monkeypatch.setattr(SnowflakeHook, "_get_conn_params", spy_params)
    monkeypatch.setattr("airflow.sdk.bases.hook.BaseHook.get_connection", classmethod(forbidden))
    monkeypatch.setattr(CortexHook, "get_statement_status", forbidden)
    monkeypatch.setattr(CortexHook, "get_conn", forbidden)
    (event,) = await _events(CortexStatementTrigger("sf_trig", ["q-a"], poll_interval=0.01))
    assert event["status"] == "success"
    assert threads and loop_thread not in threads


def test_the_triggerer_imports_the_trigger_without_the_hook() -> None:
    """The triggerer imports a trigger's class path inside its event loop: the snowflake provider and the batch
    core (all but its stdlib-only ``status`` module) are imported by ``run`` in a worker thread instead."""
    import subprocess
    import sys

    script = """
import asyncio, sys
import airflow.triggers.base
import airflow_provider_synth.triggers.cortex as t
core = [m for m in sys.modules if m.startswith("airflow_provider_synth.batch.") and m != "airflow_provider_synth.batch.status"]
assert t._HOOKS_MODULE not in sys.modules and not core, core
asyncio.run(t.CortexStatementTrigger._prepare())
assert t._HOOKS_MODULE in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
