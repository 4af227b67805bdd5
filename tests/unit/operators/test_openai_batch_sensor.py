from __future__ import annotations

import json
import time

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred
from airflow.sdk import Connection

from airflow_provider_synth.exceptions import BatchTimeoutError, TriggerEventError
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.hooks.openai_pool import close_loop_pool
from airflow_provider_synth.sensors.openai_batch import OpenAIBatchSensor, resolve_batch_ids
from airflow_provider_synth.triggers.openai_batch import OpenAIBatchTrigger

API_KEY = "sk-sensor-SECRET-24680"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["b1", "b2"], ["b1", "b2"]),
        ("b1", ["b1"]),
        ("b1, b2", ["b1", "b2"]),
        ('["b1", "b2"]', ["b1", "b2"]),
        ({"batch_ids": ["b1"], "total": 3}, ["b1"]),
        ("{'batch_ids': ['b1', 'b2'], 'total': 3}", ["b1", "b2"]),  # a rendered XCom repr
        (("b1",), ["b1"]),
    ],
)
def test_resolve_batch_ids(value, expected):
    assert resolve_batch_ids(value) == expected


@pytest.mark.parametrize("value", [[], {"total": 1}, {"batch_ids": []}, None, 42])
def test_resolve_batch_ids_rejects(value):
    with pytest.raises(ValueError, match="no batch ids"):
        resolve_batch_ids(value)


def test_deferrable_defers_the_trigger_with_an_absolute_deadline():
    sensor = OpenAIBatchSensor(task_id="wait", batch_ids={"batch_ids": ["b1", "b2"]}, conn_id="c",
                               poll_interval=15, timeout=3600, deferrable=True)
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, OpenAIBatchTrigger)
    kwargs = trigger.serialize()[1]
    assert kwargs["batch_ids"] == ["b1", "b2"] and kwargs["conn_id"] == "c" and kwargs["poll_interval"] == 15
    assert before + 3600 <= kwargs["end_time"] <= time.time() + 3600
    assert kwargs["cancel_on_kill"] is False  # the sensor does not own the batches
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.timeout.total_seconds() > 3600


def test_execute_complete_per_status():
    sensor = OpenAIBatchSensor(task_id="wait", batch_ids=["b1"], deferrable=True)
    batches = {"b1": {"status": "expired", "request_counts": {"total": 2, "completed": 1, "failed": 0},
                      "output_file_id": "f", "error_file_id": "e", "errors": []}}
    assert sensor.execute_complete({}, {"status": "success", "message": "ok", "batches": batches}) == batches
    with pytest.raises(BatchTimeoutError, match="Deadline"):
        sensor.execute_complete({}, {"status": "timeout", "message": "Deadline passed", "batches": batches})
    with pytest.raises(TriggerEventError, match="error.*boom"):
        sensor.execute_complete({}, {"status": "error", "message": "boom", "batches": batches})
    with pytest.raises(TriggerEventError, match="no usable event"):
        sensor.execute_complete({}, None)
    with pytest.raises(TriggerEventError, match="no usable event"):
        sensor.execute_complete({}, {"status": "success"})


@pytest.fixture
def server_conn(monkeypatch, batch_server_factory):
    server = batch_server_factory(api_key=API_KEY)
    conn = Connection(conn_id="srv", conn_type="synth_openai", password=API_KEY, host=server.base_url)
    monkeypatch.setenv("AIRFLOW_CONN_SRV", conn.as_json())
    return server, "srv"


def submit(conn_id: str, tmp_path, n: int = 2) -> str:
    src = tmp_path / "req.jsonl"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    src.write_text("\n".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                         "body": body}) for i in range(n)))
    hook = OpenAIBatchHook(conn_id)
    return hook.create_batch(hook.upload_file(src).id, "/v1/chat/completions").id


def test_poke_mode_against_the_server(server_conn, tmp_path):
    server, conn_id = server_conn
    server.configure(in_progress_s=2.0)
    batch_id = submit(conn_id, tmp_path)
    sensor = OpenAIBatchSensor(task_id="wait", batch_ids=[batch_id], conn_id=conn_id, deferrable=False,
                               poll_interval=0.05, timeout=30)
    first = sensor.poke({})
    assert not first.is_done and first.xcom_value is None
    server.wait_idle(10)
    done = sensor.poke({})
    assert done.is_done and done.xcom_value[batch_id]["status"] == "completed"
    assert done.xcom_value[batch_id]["request_counts"] == {"total": 2, "completed": 2, "failed": 0}


async def test_deferred_trigger_then_execute_complete(server_conn, tmp_path):
    server, conn_id = server_conn
    batch_id = submit(conn_id, tmp_path)
    sensor = OpenAIBatchSensor(task_id="wait", batch_ids=batch_id, conn_id=conn_id, deferrable=True,
                               poll_interval=0.05, timeout=30)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    classpath, kwargs = deferred.value.trigger.serialize()
    events = [e.payload async for e in OpenAIBatchTrigger(**kwargs).run()]
    await close_loop_pool()
    result = sensor.execute_complete({}, events[0])
    assert result[batch_id]["status"] == "completed"


def test_poke_follows_the_verdict(monkeypatch):
    """Poke mode tolerates transient errors up to max_consecutive_errors and stops on an unknown status."""
    from airflow_provider_synth.exceptions import BatchFailedError
    from airflow_provider_synth.testing.mock_transport import FakeBatchAPI

    conn = Connection(conn_id="fk", conn_type="synth_openai", password=API_KEY, host="http://fake.local/v1",
                      extra=json.dumps({"max_retries": 0}))
    monkeypatch.setenv("AIRFLOW_CONN_FK", conn.as_json())
    api = FakeBatchAPI()
    ok, odd = api.add_batch(["in_progress", "completed"]), api.add_batch(["in_progress", "on_holiday"])

    def sensor_for(batch_ids, max_errors):
        sensor = OpenAIBatchSensor(task_id="poke", batch_ids=batch_ids, conn_id="fk",
                                   max_consecutive_errors=max_errors)
        sensor.hook = OpenAIBatchHook("fk", client_options={"http_client": api.sync_client()})
        return sensor

    sensor = sensor_for([ok], 2)
    api.fail_next(503, 503)
    assert [sensor.poke({}).is_done for _ in range(4)] == [False, False, False, True]
    api.fail_next(503, 503, 503)
    sensor = sensor_for([ok], 2)
    assert [sensor.poke({}).is_done for _ in range(2)] == [False, False]
    with pytest.raises(BatchFailedError, match="3 times in a row"):
        sensor.poke({})
    sensor = sensor_for([odd], 2)
    assert sensor.poke({}).is_done is False
    with pytest.raises(BatchFailedError, match="unknown status 'on_holiday'"):
        sensor.poke({})


def test_reschedule_mode_counts_errors_across_pokes(monkeypatch, tmp_path):
    """In reschedule mode every poke is a new process (a new sensor object, its XCom cleared): the count of
    transient errors in a row is kept in the submitting run's work folder, so ``max_consecutive_errors``
    applies. Old main reset it every poke: a batch API failing for good was polled until the sensor's timeout."""
    from types import SimpleNamespace

    from airflow_provider_synth.exceptions import BatchFailedError
    from airflow_provider_synth.testing.mock_transport import FakeBatchAPI

    conn = Connection(conn_id="fk", conn_type="synth_openai", password=API_KEY, host="http://fake.local/v1",
                      extra=json.dumps({"max_retries": 0}))
    monkeypatch.setenv("AIRFLOW_CONN_FK", conn.as_json())
    api = FakeBatchAPI()
    batch = api.add_batch(["in_progress", "completed"])
    manifest = {"batch_ids": [batch], "work_dir": str(tmp_path / "_work")}

    def poke(try_number: int = 1):
        sensor = OpenAIBatchSensor(task_id="wait", batch_ids=manifest, conn_id="fk", max_consecutive_errors=2,
                                   mode="reschedule", deferrable=False)
        sensor.hook = OpenAIBatchHook("fk", client_options={"http_client": api.sync_client()})
        ti = SimpleNamespace(task_id="wait", map_index=-1, try_number=try_number)
        return sensor.poke({"ti": ti})

    api.fail_next(503, 503, 503, 503)
    assert [poke().is_done, poke().is_done] == [False, False]
    with pytest.raises(BatchFailedError, match="3 times in a row"):
        poke()
    assert poke(try_number=2).is_done is False  # a new try starts counting afresh
    assert poke(try_number=2).is_done is False and poke(try_number=2).is_done is True
