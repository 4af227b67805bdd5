from __future__ import annotations

import asyncio
import json
import logging
import warnings

import httpx2
import pytest
from airflow.sdk import Connection

import airflow_provider_synth.triggers.base as trigger_base
from airflow_provider_synth.hooks.openai import OpenAIBatchAsyncHook, OpenAIBatchHook
from airflow_provider_synth.testing.mock_transport import FakeBatchAPI
from airflow_provider_synth.triggers.openai_batch import OpenAIBatchTrigger

API_KEY = "sk-trigger-SECRET-9876543210"
CONN_ID = "synth_openai_default"


@pytest.fixture
def api(monkeypatch) -> FakeBatchAPI:
    """A fake API behind the async client every trigger hook builds; the sync paths are booby-trapped."""
    conn = Connection(conn_id=CONN_ID, conn_type="synth_openai", password=API_KEY, host="http://fake.local/v1",
                      extra=json.dumps({"max_retries": 0}))
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", conn.as_json())
    fake = FakeBatchAPI()
    use_transport(monkeypatch, fake.handle)

    def no_sync(*a, **k):
        raise AssertionError("blocking call inside the trigger")

    monkeypatch.setattr(OpenAIBatchHook, "get_connection", classmethod(no_sync))
    monkeypatch.setattr(OpenAIBatchHook, "get_conn", no_sync)
    return fake


def use_transport(monkeypatch, handler) -> None:
    """Every hook the trigger builds gets its own async HTTP client over ``handler``."""

    def hook_factory(*args, **kwargs):
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        return OpenAIBatchAsyncHook(*args, client_options={"http_client": client}, **kwargs)

    monkeypatch.setattr(OpenAIBatchTrigger, "_hook", lambda self: hook_factory(self.conn_id))


def fake_trigger_sleep(monkeypatch, sleep) -> None:
    """Replace ``asyncio.sleep`` as the triggers' poll loop (triggers/base.py) sees it, and only there: the event loop, the HTTP
    client and every other module keep the real one."""
    import types

    monkeypatch.setattr(trigger_base, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep}))


def poll_spy(monkeypatch) -> tuple[list[str], dict[int, asyncio.Event]]:
    """Record every batch poll; ``rounds[n]`` is set when poll ``n`` (1-based) starts."""
    calls: list[str] = []
    rounds: dict[int, asyncio.Event] = {}
    real = OpenAIBatchAsyncHook.aget_batch_state

    async def spy(self, batch_id):
        calls.append(batch_id)
        rounds.setdefault(len(calls), asyncio.Event()).set()
        return await real(self, batch_id)

    monkeypatch.setattr(OpenAIBatchAsyncHook, "aget_batch_state", spy)
    return calls, rounds


async def until(rounds: dict[int, asyncio.Event], n: int, timeout: float = 30) -> None:
    await asyncio.wait_for(rounds.setdefault(n, asyncio.Event()).wait(), timeout)


def logs(capsys) -> str:
    """Airflow routes trigger logs through structlog to the console: read them there."""
    captured = capsys.readouterr()
    return captured.out + captured.err


async def collect(trigger: OpenAIBatchTrigger) -> list[dict]:
    """Run the trigger to its end under asyncio debug, failing on any callback that hogs the loop."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.1
    events = [event.payload async for event in trigger.run()]
    return events


def done(total=2, completed=2, failed=0, output="file-out", error=None) -> dict:
    return {"status": "completed", "request_counts": {"total": total, "completed": completed, "failed": failed},
            "output_file_id": output, "error_file_id": error}


# -- schema -----------------------------------------------------------------------------------------------------


def test_serialize_round_trip_is_json_primitives_without_secrets():
    trigger = OpenAIBatchTrigger(CONN_ID, ["b1", "b2"], poll_interval=5, end_time=1_800_000_000.5,
                                 max_consecutive_errors=3, cancel_on_kill=False)
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_synth.triggers.openai_batch.OpenAIBatchTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert API_KEY not in json.dumps(kwargs)
    again = OpenAIBatchTrigger(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert kwargs == {"conn_id": CONN_ID, "batch_ids": ["b1", "b2"], "poll_interval": 5.0,
                      "end_time": 1_800_000_000.5, "max_consecutive_errors": 3, "cancel_on_kill": False}


def test_old_kwargs_still_load():
    """Kwargs stored before the optional ones existed re-create the trigger with the defaults."""
    trigger = OpenAIBatchTrigger(conn_id=CONN_ID, batch_ids=["b1"])
    assert trigger.serialize()[1]["max_consecutive_errors"] == 5 and trigger.end_time is None


def test_needs_a_batch():
    with pytest.raises(ValueError, match="at least one batch"):
        OpenAIBatchTrigger(CONN_ID, [])


def test_importable_by_classpath():
    from airflow.providers.common.compat.module_loading import import_string

    classpath, kwargs = OpenAIBatchTrigger(CONN_ID, ["b"]).serialize()
    assert import_string(classpath)(**kwargs).batch_ids == ["b"]


# -- run --------------------------------------------------------------------------------------------------------


async def test_one_terminal_event_with_every_batch(api, caplog, capsys):
    # warm-up: the first request imports the SDK's lazily loaded modules once per process
    await collect(OpenAIBatchTrigger(CONN_ID, [api.add_batch([done()])]))
    api.counters.clear()
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    capsys.readouterr()
    b1 = api.add_batch(["validating", "in_progress", "finalizing", done()])
    b2 = api.add_batch(["in_progress", "cancelling", {"status": "cancelled"}])
    b3 = api.add_batch([done(total=3, completed=0, failed=3, output=None, error="file-err")])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        events = await collect(OpenAIBatchTrigger(CONN_ID, [b1, b2, b3], poll_interval=0.01))
    assert len(events) == 1
    event = events[0]
    assert event["status"] == "success"
    assert set(event["batches"]) == {b1, b2, b3}
    assert event["batches"][b1]["status"] == "completed"
    assert event["batches"][b2]["status"] == "cancelled"
    assert event["batches"][b3] == {"status": "completed", "output_file_id": None, "error_file_id": "file-err",
                                    "request_counts": {"total": 3, "completed": 0, "failed": 3}, "errors": [],
                                    "usage": None, "model": None}
    assert "1 cancelled, 2 completed" in event["message"]
    assert f"every request failed): {b3}" in event["message"]
    # terminal batches are not polled again; progress is logged on change only
    assert api.counters["batches_retrieved"] == 4 + 3 + 1
    text = logs(capsys)
    progress = [line.split("] ", 1)[1].split(" [")[0] for line in text.splitlines() if f"] batch {b1}:" in line]
    assert progress == [
        f"batch {b1}: validating, 0/0 completed, 0 failed",
        f"batch {b1}: in_progress, 0/0 completed, 0 failed",
        f"batch {b1}: finalizing, 0/0 completed, 0 failed",
        f"batch {b1}: completed, 2/2 completed, 0 failed",
    ]
    assert API_KEY not in caplog.text + text
    assert "Executing" not in caplog.text  # asyncio debug: no slow callback


async def test_polls_all_batches_concurrently(api, monkeypatch):
    ids = [api.add_batch(["in_progress", done()]) for _ in range(20)]
    in_flight, peak = 0, 0
    all_in = asyncio.Event()
    real = OpenAIBatchAsyncHook.aget_batch

    async def slow_get(self, batch_id):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == len(ids):
            all_in.set()
        if peak < len(ids):  # the first round: no poll returns before all 20 are in flight (polled in turn,
            await asyncio.wait_for(all_in.wait(), 30)  # they would time out here)
        in_flight -= 1
        return await real(self, batch_id)

    monkeypatch.setattr(OpenAIBatchAsyncHook, "aget_batch", slow_get)
    events = await collect(OpenAIBatchTrigger(CONN_ID, ids, poll_interval=0.01))
    assert events[0]["status"] == "success" and peak == 20


async def test_cancelling_is_still_running(api, monkeypatch):
    batch_id = api.add_batch(["cancelling"])
    calls, rounds = poll_spy(monkeypatch)
    task = asyncio.ensure_future(collect(OpenAIBatchTrigger(CONN_ID, [batch_id], poll_interval=0.01)))
    await until(rounds, 3)  # polled a third time: the first two answers did not end the wait
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [batch_id] * 3


async def test_unknown_status_is_an_error(api):
    batch_id = api.add_batch(["in_progress", "paused_by_aliens"])
    events = await collect(OpenAIBatchTrigger(CONN_ID, [batch_id], poll_interval=0.01))
    assert len(events) == 1 and events[0]["status"] == "error"
    assert "unknown status 'paused_by_aliens'" in events[0]["message"]


async def test_deadline_times_out_and_a_recreated_trigger_keeps_it(api, monkeypatch):
    monkeypatch.setattr(OpenAIBatchTrigger, "jitter", 0.0)
    monkeypatch.setattr(OpenAIBatchTrigger, "start_spread", 0.0)
    clock = [1_000.0]
    monkeypatch.setattr(trigger_base, "_now", lambda: clock[0])
    sleeps = []

    async def fake_sleep(delay):
        sleeps.append(delay)
        clock[0] += delay

    fake_trigger_sleep(monkeypatch, fake_sleep)
    batch_id = api.add_batch(["in_progress"])
    trigger = OpenAIBatchTrigger(CONN_ID, [batch_id], poll_interval=30, end_time=1_100.0)
    events = await collect(trigger)
    assert [e["status"] for e in events] == ["timeout"]
    assert batch_id in events[0]["message"] and "1 of 1 batches still running" in events[0]["message"]
    assert events[0]["batches"][batch_id]["status"] == "in_progress"
    assert sleeps == [0, 30, 30, 30, 10]  # never sleeps past the deadline

    # a triggerer restart re-creates the trigger from its kwargs: the deadline does not move
    clock[0] = 1_050.0
    sleeps.clear()
    recreated = OpenAIBatchTrigger(**trigger.serialize()[1])
    events = await collect(recreated)
    assert [e["status"] for e in events] == ["timeout"] and sum(sleeps) == 50
    clock[0] = 2_000.0  # already past: one last poll, then timeout at once
    events = await collect(OpenAIBatchTrigger(**trigger.serialize()[1]))
    assert [e["status"] for e in events] == ["timeout"]


async def test_finished_at_the_deadline_is_success(api, monkeypatch):
    monkeypatch.setattr(trigger_base, "_now", lambda: 5_000.0)
    batch_id = api.add_batch([done()])
    events = await collect(OpenAIBatchTrigger(CONN_ID, [batch_id], end_time=4_000.0))
    assert events[0]["status"] == "success"


async def test_transient_errors_are_tolerated(api):
    batch_id = api.add_batch(["in_progress", done()])
    api.fail_next(500, 429, 503)
    events = await collect(OpenAIBatchTrigger(CONN_ID, [batch_id], poll_interval=0.01, max_consecutive_errors=3))
    assert [e["status"] for e in events] == ["success"]


async def test_too_many_transient_errors_give_up(api, caplog):
    batch_id = api.add_batch(["in_progress"])
    api.fail_next(*[500] * 10)
    events = await collect(OpenAIBatchTrigger(CONN_ID, [batch_id], poll_interval=0.01, max_consecutive_errors=2))
    assert len(events) == 1 and events[0]["status"] == "error"
    assert "3 times in a row" in events[0]["message"] and "InternalServerError" in events[0]["message"]
    assert api.faults == [500] * 7


async def test_non_transient_error_fails_at_once(api):
    events = await collect(OpenAIBatchTrigger(CONN_ID, ["batch_missing"], poll_interval=0.01))
    assert events[0]["status"] == "error" and "NotFoundError" in events[0]["message"]
    assert events[0]["batches"]["batch_missing"]["status"] is None


async def test_secret_never_in_event_or_logs(api, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)

    def leaky(request):
        return httpx2.Response(401, json={"error": {"message": f"Incorrect API key provided: {API_KEY}"}})

    use_transport(monkeypatch, leaky)
    trigger = OpenAIBatchTrigger(CONN_ID, ["b1"], poll_interval=0.01)
    events = await collect(trigger)
    assert events[0]["status"] == "error" and "AuthenticationError" in events[0]["message"]
    text = caplog.text + logs(capsys)
    assert "Polling batch b1 failed" in text and "***" in text
    assert API_KEY not in json.dumps(events) and API_KEY not in text and API_KEY not in repr(trigger)


async def test_bad_connection_is_an_error_event(monkeypatch, api):
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({"conn_type": "synth_openai"}))
    events = await collect(OpenAIBatchTrigger(CONN_ID, ["b1"], poll_interval=0.01))
    assert events[0]["status"] == "error" and "has no API key" in events[0]["message"]


def spy_hooks(monkeypatch) -> list:
    """The hooks the trigger creates, in order."""
    hooks = []
    factory = OpenAIBatchTrigger._hook

    def spy(self):
        hooks.append(factory(self))
        return hooks[-1]

    monkeypatch.setattr(OpenAIBatchTrigger, "_hook", spy)
    return hooks


async def test_client_is_released_before_the_event_is_yielded(api, monkeypatch):
    """dag.test() takes the first event and drops the generator: nothing may be left to a finalizer."""
    hooks = spy_hooks(monkeypatch)
    batch_id = api.add_batch([done()])
    event = await anext(OpenAIBatchTrigger(CONN_ID, [batch_id], poll_interval=0.01).run())
    assert event.payload["status"] == "success"
    assert hooks[0]._async_client is None


async def test_client_is_closed(api, monkeypatch):
    hooks = spy_hooks(monkeypatch)
    batch_id = api.add_batch([done()])
    await collect(OpenAIBatchTrigger(CONN_ID, [batch_id], poll_interval=0.01))
    assert len(hooks) == 1 and hooks[0]._async_client is None


# -- on_kill ----------------------------------------------------------------------------------------------------


async def test_on_kill_cancels_running_batches_only(api, monkeypatch):
    running = api.add_batch(["in_progress"])
    finished = api.add_batch([done()])
    calls, rounds = poll_spy(monkeypatch)
    trigger = OpenAIBatchTrigger(CONN_ID, [running, finished], poll_interval=0.01)
    task = asyncio.ensure_future(collect(trigger))
    await until(rounds, 3)  # the second round has started: the first round's answers are taken in
    assert calls[2:] == [running], "the finished batch is not polled again"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await trigger.on_kill()
    assert api.counters["batches_cancelled"] == 1
    assert api.batches[running]["status"] == "cancelling" and api.batches[finished]["status"] == "completed"


async def test_on_kill_before_any_poll_cancels_everything(api):
    ids = [api.add_batch(["in_progress"]) for _ in range(3)]
    await OpenAIBatchTrigger(CONN_ID, ids).on_kill()
    assert api.counters["batches_cancelled"] == 3


async def test_on_kill_respects_cancel_on_kill_false(api):
    batch_id = api.add_batch(["in_progress"])
    await OpenAIBatchTrigger(CONN_ID, [batch_id], cancel_on_kill=False).on_kill()
    assert api.counters["batches_cancelled"] == 0


async def test_on_kill_survives_api_errors(api, capsys):
    ids = [api.add_batch(["in_progress"]) for _ in range(2)]
    api.fail_next(500)
    await OpenAIBatchTrigger(CONN_ID, ids).on_kill()
    assert api.counters["batches_cancelled"] == 1
    text = logs(capsys)
    assert f"Cancelling batch {ids[0]} failed: InternalServerError" in text
    assert f"Cancelled batch {ids[1]} (status cancelling)" in text


async def test_on_kill_gives_up_after_its_own_timeout(api, monkeypatch, capsys):
    batch_id = api.add_batch(["in_progress"])
    monkeypatch.setattr(OpenAIBatchTrigger, "cancel_timeout", 0.05)

    never = asyncio.Event()

    async def hang(self, batch_id):
        await never.wait()  # a cancel call that never returns

    monkeypatch.setattr(OpenAIBatchAsyncHook, "acancel_batch", hang)
    await asyncio.wait_for(OpenAIBatchTrigger(CONN_ID, [batch_id]).on_kill(), timeout=30)
    assert f"Cancelling batches took over 0 s; they may still be running: {batch_id}" in logs(capsys)


async def test_polls_are_jittered(api, monkeypatch):
    sleeps = []

    async def fake_sleep(delay):
        sleeps.append(delay)

    fake_trigger_sleep(monkeypatch, fake_sleep)
    batch_id = api.add_batch(["in_progress"] * 50 + [done()])
    events = await collect(OpenAIBatchTrigger(CONN_ID, [batch_id], poll_interval=10))
    assert events[0]["status"] == "success"
    first, rest = sleeps[0], sleeps[1:]
    assert 0 <= first <= 0.5  # start spread: half of min(poll_interval, 1 s)
    assert len(rest) == 50 and all(9.0 <= d <= 11.0 for d in rest) and len(set(rest)) > 40


def test_the_triggerer_imports_the_trigger_without_the_sdk_and_run_imports_it_off_the_loop() -> None:
    """The triggerer imports a trigger's class path inside its event loop: the module must not pull in the
    OpenAI SDK (a second or more of import); ``run`` imports it in a worker thread instead."""
    import subprocess
    import sys

    script = """
import asyncio, importlib, sys, threading
import airflow.triggers.base
import airflow_provider_synth.triggers.openai_batch as t
assert "openai" not in sys.modules, "the trigger module imported openai"
assert "airflow_provider_synth.hooks.openai" not in sys.modules
threads = []
real = importlib.import_module
def spy(name, *a):
    if name == t._HOOKS_MODULE:
        threads.append(threading.current_thread() is threading.main_thread())
    return real(name, *a)
t.importlib.import_module = spy
asyncio.run(t.OpenAIBatchTrigger._prepare())
assert "openai" in sys.modules and threads == [False], threads
import airflow_provider_synth.hooks.openai_pool as pool
assert pool.shared_ssl_context.cache_info().currsize == 1  # the TLS context is built there too
asyncio.run(t.OpenAIBatchTrigger._prepare())  # done once per process
assert threads == [False], threads
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
