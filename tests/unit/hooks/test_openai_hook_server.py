"""The hooks and the trigger through the real ``openai`` SDK, over HTTP, against the local Batch API server."""

from __future__ import annotations

import json

import openai
import pytest
from airflow.sdk import Connection, ObjectStoragePath

from airflow_provider_synth.hooks.openai import (
    AzureOpenAIBatchHook,
    OpenAIBatchAsyncHook,
    OpenAIBatchHook,
    batch_summary,
)
from airflow_provider_synth.hooks.openai_pool import close_loop_pool
from airflow_provider_synth.server.server import Outcome
from airflow_provider_synth.triggers.openai_batch import OpenAIBatchTrigger

API_KEY = "sk-server-SECRET-1357924680"


def request_line(i: int) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"say {i}"}]}
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()


@pytest.fixture(autouse=True)
async def _close_shared_pool():
    """Async hooks share one HTTP pool per loop; close it before the test's loop ends."""
    yield
    await close_loop_pool()


@pytest.fixture
def server(batch_server_factory):
    return batch_server_factory(api_key=API_KEY)


@pytest.fixture
def openai_conn(monkeypatch, server):
    conn = Connection(conn_id="srv", conn_type="synth_openai", password=API_KEY, host=server.base_url,
                      extra=json.dumps({"max_retries": 1, "timeout": 10}))
    monkeypatch.setenv("AIRFLOW_CONN_SRV", conn.as_json())
    return "srv"


def entra_token() -> str:
    return API_KEY  # the local server checks the bearer token against its key


@pytest.fixture
def azure_conns(monkeypatch, server):
    key = Connection(conn_id="az_key", conn_type="synth_azure_openai", password=API_KEY, host=server.azure_endpoint,
                     extra=json.dumps({"api_version": "2025-04-01-preview"}))
    entra = Connection(conn_id="az_entra", conn_type="synth_azure_openai", host=server.azure_endpoint,
                       extra=json.dumps({"api_version": "2025-04-01-preview",
                                         "azure_ad_token_provider": f"{__name__}.entra_token"}))
    monkeypatch.setenv("AIRFLOW_CONN_AZ_KEY", key.as_json())
    monkeypatch.setenv("AIRFLOW_CONN_AZ_ENTRA", entra.as_json())
    monkeypatch.setenv("AIRFLOW__SYNTH__ALLOW_TOKEN_PROVIDER_IMPORT", "True")  # the deployment allows it
    return ["az_key", "az_entra"]


def write_requests(tmp_path, n: int) -> ObjectStoragePath:
    path = ObjectStoragePath(f"file://{tmp_path}/shard-0000.jsonl")
    path.write_bytes(b"\n".join(request_line(i) for i in range(n)) + b"\n")
    return path


async def wait(conn_id: str, batch_ids: list[str]) -> dict:
    events = [e.payload async for e in OpenAIBatchTrigger(conn_id, batch_ids, poll_interval=0.05).run()]
    assert len(events) == 1
    return events[0]


async def test_upload_create_wait_download(server, openai_conn, tmp_path):
    server.set_outcome("req-3", Outcome.error(400, message="bad request"))
    hook = OpenAIBatchHook(openai_conn)
    file = hook.upload_file(write_requests(tmp_path, 10))
    batch = hook.create_batch(file.id, "/v1/chat/completions", metadata={"synth_key": "abc", "shard": "0"})
    assert batch.status == "validating"

    event = await wait(openai_conn, [batch.id])
    state = event["batches"][batch.id]
    assert event["status"] == "success" and state["status"] == "completed"
    assert state["request_counts"] == {"total": 10, "completed": 9, "failed": 1}

    out = tmp_path / "out" / "output.jsonl"
    err = ObjectStoragePath(f"file://{tmp_path}/out/errors.jsonl")
    hook.download_file(state["output_file_id"], out)
    hook.download_file(state["error_file_id"], err)
    ok_ids = {json.loads(line)["custom_id"] for line in out.read_text().splitlines()}
    assert ok_ids == {f"req-{i}" for i in range(10)} - {"req-3"}
    assert [json.loads(line)["custom_id"] for line in err.read_text().splitlines()] == ["req-3"]

    assert [b.id for b in hook.find_batches({"synth_key": "abc"})] == [batch.id]
    assert hook.find_batches({"synth_key": "other"}) == []
    assert server.counters["files_created"] == 1 and server.counters["batches_created"] == 1
    assert {f.id for f in hook.list_files(purpose="batch")} == {file.id}
    assert hook.delete_file(file.id).deleted


async def test_all_failed_batch_is_visible_in_the_event(server, openai_conn, tmp_path):
    server.set_outcome("req-*", Outcome.error(500))
    hook = OpenAIBatchHook(openai_conn)
    batch = hook.create_batch(hook.upload_file(write_requests(tmp_path, 3)).id, "/v1/chat/completions")
    event = await wait(openai_conn, [batch.id])
    state = event["batches"][batch.id]
    assert event["status"] == "success" and state["status"] == "completed"
    assert state["output_file_id"] is None and state["error_file_id"]
    assert "every request failed" in event["message"]


async def test_cancel_through_sync_and_async(server, openai_conn, tmp_path):
    server.configure(in_progress_s=30)
    hook = OpenAIBatchHook(openai_conn)
    file_id = hook.upload_file(write_requests(tmp_path, 2)).id
    first = hook.create_batch(file_id, "/v1/chat/completions")
    second = hook.create_batch(file_id, "/v1/chat/completions")
    assert hook.cancel_batch(first.id).status in ("cancelling", "cancelled")
    async with OpenAIBatchAsyncHook(openai_conn) as async_hook:
        assert (await async_hook.acancel_batch(second.id)).status in ("cancelling", "cancelled")
    event = await wait(openai_conn, [first.id, second.id])
    assert {s["status"] for s in event["batches"].values()} == {"cancelled"}


async def test_trigger_on_kill_cancels_on_the_server(server, openai_conn, tmp_path):
    server.configure(in_progress_s=30)
    hook = OpenAIBatchHook(openai_conn)
    batch = hook.create_batch(hook.upload_file(write_requests(tmp_path, 2)).id, "/v1/chat/completions")
    await OpenAIBatchTrigger(openai_conn, [batch.id]).on_kill()
    server.wait_idle(5)
    assert server.batch(batch.id)["status"] == "cancelled"


async def test_trigger_rides_out_injected_faults(server, openai_conn, tmp_path):
    hook = OpenAIBatchHook(openai_conn)
    batch = hook.create_batch(hook.upload_file(write_requests(tmp_path, 2)).id, "/v1/chat/completions")
    # max_retries=1 in the connection: each poll makes 2 attempts; 6 faults = 3 failed polls, under the limit
    server.add_fault("GET /v1/batches/*", status=503, retry_after=0, times=6)
    event = await wait(openai_conn, [batch.id])
    assert event["status"] == "success"
    assert server.counters["faults_injected"] == 6


async def test_azure_key_and_entra_token(server, azure_conns, tmp_path):
    for conn_id in azure_conns:
        hook = AzureOpenAIBatchHook(conn_id)
        assert hook.test_connection() == (True, "Connection successfully tested")
        batch = hook.create_batch(hook.upload_file(write_requests(tmp_path, 2)).id, "/v1/chat/completions")
        assert isinstance(hook.client, openai.AzureOpenAI)
        event = await wait(conn_id, [batch.id])
        assert event["batches"][batch.id]["request_counts"]["completed"] == 2
        hook.download_file(event["batches"][batch.id]["output_file_id"], tmp_path / f"{conn_id}.jsonl")
        assert len((tmp_path / f"{conn_id}.jsonl").read_text().splitlines()) == 2
    routes = server.counters["http_requests"]
    assert all(route.split(" ", 1)[1].startswith("/openai/") for route in routes), routes
    assert server.counters["batches_created"] == 2


def test_test_connection_with_a_wrong_key(monkeypatch, server):
    monkeypatch.setenv("AIRFLOW_CONN_WRONG", Connection(conn_id="wrong", conn_type="synth_openai",
                                                        password="sk-wrong-key-000", host=server.base_url).as_json())
    ok, message = OpenAIBatchHook("wrong").test_connection()
    assert not ok and "AuthenticationError" in message and "sk-wrong-key-000" not in message
    assert server.counters["files_created"] == 0 and server.counters["batches_created"] == 0


async def test_official_openai_connection_type_in_the_trigger(monkeypatch, server, tmp_path):
    conn = Connection(conn_id="official", conn_type="openai", password=API_KEY,
                      extra=json.dumps({"openai_client_kwargs": {"base_url": server.base_url}}))
    monkeypatch.setenv("AIRFLOW_CONN_OFFICIAL", conn.as_json())
    hook = OpenAIBatchHook("official")
    batch = hook.create_batch(hook.upload_file(write_requests(tmp_path, 2)).id, "/v1/chat/completions")
    event = await wait("official", [batch.id])
    assert event["status"] == "success" and event["batches"][batch.id]["status"] == "completed"


async def test_a_multi_batch_trigger_leaves_no_connection_open(server, openai_conn, tmp_path):
    """As dag.test() runs it: take the first event, drop the generator; the loop's pool is closed already."""
    import asyncio

    import airflow_provider_synth.hooks.openai_pool as pool_mod

    hook = OpenAIBatchHook(openai_conn)
    file_id = hook.upload_file(write_requests(tmp_path, 2)).id
    ids = [hook.create_batch(file_id, "/v1/chat/completions").id for _ in range(3)]
    event = await anext(OpenAIBatchTrigger(openai_conn, ids, poll_interval=0.05).run())
    assert event.payload["status"] == "success"
    assert asyncio.get_running_loop() not in pool_mod._loop_pools


async def test_trigger_polls_skip_the_sdk_on_a_plain_openai_connection(server, openai_conn, tmp_path, monkeypatch):
    """Polls on the loop's shared client are one GET parsed by orjson (no SDK request, no pydantic ``Batch``)."""
    server.set_outcome("req-1", Outcome.error(400, message="bad request"))
    hook = OpenAIBatchHook(openai_conn)
    batch = hook.create_batch(hook.upload_file(write_requests(tmp_path, 3)).id, "/v1/chat/completions")
    through_sdk: list[str] = []
    real = OpenAIBatchAsyncHook.aget_batch

    async def counting(self, batch_id):
        through_sdk.append(batch_id)
        return await real(self, batch_id)

    monkeypatch.setattr(OpenAIBatchAsyncHook, "aget_batch", counting)
    event = await wait(openai_conn, [batch.id])
    assert event["status"] == "success" and through_sdk == []
    assert event["batches"][batch.id] == batch_summary(hook.get_batch(batch.id))  # the same state as the SDK's
    assert event["batches"][batch.id]["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    # two state changes logged above, plus the sync check just made
    assert server.counters["http_requests"]["GET /v1/batches/{batch_id}"] >= 3


async def test_direct_poll_falls_back_to_the_sdk(server, openai_conn, tmp_path):
    """A failed direct GET is retried through the SDK: its retries, and its error types for the trigger."""
    server.configure(in_progress_s=30)
    hook = OpenAIBatchHook(openai_conn)
    batch = hook.create_batch(hook.upload_file(write_requests(tmp_path, 2)).id, "/v1/chat/completions")
    server.add_fault("GET /v1/batches/*", status=503, retry_after=0, times=2)  # direct GET + the SDK's 1st try
    async with OpenAIBatchAsyncHook(openai_conn) as async_hook:
        assert (await async_hook.aget_batch_state(batch.id))["status"] in ("validating", "in_progress")
        assert server.counters["faults_injected"] == 2
        with pytest.raises(openai.NotFoundError):
            await async_hook.aget_batch_state("batch_does_not_exist")


async def test_azure_polls_go_through_the_sdk(server, azure_conns, tmp_path):
    async with OpenAIBatchAsyncHook("az_key") as async_hook:
        await async_hook.get_async_client()
        assert async_hook._lease is not None and async_hook._lease.entry.direct is None
