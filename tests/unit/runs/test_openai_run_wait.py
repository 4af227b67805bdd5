"""The worker-side wait (operator without deferral, CLI ``download --wait``) follows THE verdict: transient
polling errors are tolerated up to a limit, an unknown status stops the wait, a fatal error propagates."""

from __future__ import annotations

import json

import openai
import pytest
from airflow.sdk import Connection

from airflow_provider_synth.batch.status import Next
from airflow_provider_synth.exceptions import BatchFailedError
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.runs.openai import BatchRef, BatchRun, Plan
from airflow_provider_synth.testing.mock_transport import FakeBatchAPI

API_KEY = "sk-run-wait-SECRET-13579"


@pytest.fixture
def api(monkeypatch) -> FakeBatchAPI:
    conn = Connection(conn_id="w", conn_type="synth_openai", password=API_KEY, host="http://fake.local/v1",
                      extra=json.dumps({"max_retries": 0}))
    monkeypatch.setenv("AIRFLOW_CONN_W", conn.as_json())
    return FakeBatchAPI()


def run_of(api: FakeBatchAPI, *scripts: list) -> BatchRun:
    hook = OpenAIBatchHook("w", client_options={"http_client": api.sync_client()})
    plan = Plan(key="k", conn_id="w", endpoint="/v1/chat/completions", model="m", completion_window="24h",
                work_dir="/nonexistent", output_dir="/nonexistent", shards=[], total=0, fingerprint="f")
    run = BatchRun(hook, plan)
    for shard, script in enumerate(scripts):
        batch_id = api.add_batch(script)
        run.batches[(shard, 0)] = BatchRef(shard, 0, batch_id, {"status": "validating"}, 0.0)
    return run


def test_transient_errors_are_tolerated(api):
    run = run_of(api, ["in_progress", "completed"])
    api.fail_next(500, 429, 503)
    sleeps: list[float] = []
    result = run.wait(1.0, None, max_consecutive_errors=3, sleep=sleeps.append)
    assert result.next is Next.DONE and run.statuses() == {"completed": 1}
    assert api.faults == [] and len(sleeps) == 5


def test_too_many_transient_errors_fail(api):
    run = run_of(api, ["in_progress"])
    api.fail_next(*[502] * 10)
    with pytest.raises(BatchFailedError, match="3 times in a row"):
        run.wait(1.0, None, max_consecutive_errors=2, sleep=lambda s: None)
    assert len(api.faults) == 7


def test_an_unknown_status_stops_the_wait(api):
    run = run_of(api, ["in_progress", "paused_by_aliens"])
    with pytest.raises(BatchFailedError, match="unknown status 'paused_by_aliens'"):
        run.wait(1.0, None, sleep=lambda s: None)


def test_a_fatal_error_propagates_as_raised(api):
    run = run_of(api, ["in_progress"])
    api.fail_next(404)
    with pytest.raises(openai.NotFoundError):
        run.wait(1.0, None, sleep=lambda s: None)


def test_the_deadline_ends_the_wait(api, monkeypatch):
    import airflow_provider_synth.runs.openai as runs_openai

    clock = [1000.0]
    monkeypatch.setattr(runs_openai.time, "time", lambda: clock[0])
    run = run_of(api, ["in_progress"], ["in_progress", "completed"])

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    result = run.wait(30.0, 1045.0, sleep=sleep)
    assert result.next is Next.TIMEOUT and len(result.ids) == 1 and clock[0] == 1045.0
