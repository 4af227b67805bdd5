"""AnthropicBatchHook reads the official anthropic provider's connection unchanged."""

from __future__ import annotations

import json

import pytest

anthropic = pytest.importorskip("anthropic")

from airflow.sdk import Connection  # noqa: E402

from airflow_provider_synth.exceptions import ConnectionConfigError  # noqa: E402
from airflow_provider_synth.hooks.anthropic import AnthropicBatchAsyncHook, AnthropicBatchHook  # noqa: E402

KEY = "sk-ant-hook-SECRET-42"


def conn(monkeypatch, conn_id="claude_h", **fields):
    fields.setdefault("conn_type", "anthropic")
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", Connection(conn_id=conn_id, **fields).as_json())
    return conn_id


def test_the_official_connection_form_works_unchanged(monkeypatch):
    cid = conn(monkeypatch, password=KEY, host="gateway.example.com",
               extra=json.dumps({"anthropic_client_kwargs": {"timeout": 30, "max_retries": 5}, "model": "claude-x"}))
    hook = AnthropicBatchHook(cid)
    assert hook.client.api_key == KEY and str(hook.client.base_url).startswith("https://gateway.example.com")
    assert hook.client.max_retries == 5 and hook.client.timeout == 30
    assert hook.api_version == "2026-10-21"  # the SDK's own header


def test_base_url_and_key_from_client_kwargs_and_an_api_version(monkeypatch):
    cid = conn(monkeypatch, extra=json.dumps({"anthropic_client_kwargs": {"api_key": KEY,
                                                                          "base_url": "http://127.0.0.1:9"},
                                              "api_version": "2023-06-01"}))
    hook = AnthropicBatchHook(cid)
    assert hook.client.api_key == KEY and str(hook.client.base_url).startswith("http://127.0.0.1:9")
    assert hook.api_version == "2023-06-01" and hook.client.default_headers["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize(("fields", "match"), [
    ({"password": KEY, "extra": json.dumps({"platform": "bedrock"})}, "does not serve Message Batches"),
    ({}, "has no API key"),
    ({"conn_type": "openai", "password": KEY}, "expected 'anthropic'"),
])
def test_bad_connections_are_refused_without_the_secret(monkeypatch, fields, match):
    cid = conn(monkeypatch, **fields)
    with pytest.raises(ConnectionConfigError, match=match) as info:
        AnthropicBatchHook(cid).get_conn()
    assert KEY not in str(info.value)


async def test_the_async_hook_uses_the_async_lookup_and_closes(monkeypatch):
    cid = conn(monkeypatch, password=KEY, host="http://127.0.0.1:9")

    def trap(*a, **k):
        raise AssertionError("sync lookup in the async hook")

    monkeypatch.setattr(AnthropicBatchHook, "get_conn", trap)
    async with AnthropicBatchAsyncHook(cid) as hook:
        client = await hook.get_async_client()
        assert isinstance(client, anthropic.AsyncAnthropic) and client is await hook.get_async_client()
    assert hook._async_client is None


def test_the_connection_test_spends_nothing_and_hides_the_key(monkeypatch, batch_server_factory):
    server = batch_server_factory(api_key=KEY)
    ok = conn(monkeypatch, "good", password=KEY, host=server.url)
    bad = conn(monkeypatch, "bad", password=KEY + "x", host=server.url,
               extra=json.dumps({"anthropic_client_kwargs": {"max_retries": 0}}))
    assert AnthropicBatchHook(ok).test_connection() == (True, "Connection successfully tested")
    good, message = AnthropicBatchHook(bad).test_connection()
    assert not good and "AuthenticationError" in message and KEY not in message
    assert server.counters["message_batches_created"] == 0


async def test_hooks_of_one_connection_share_one_client_on_a_loop(monkeypatch):
    """A hundred triggers starting together build one client (each one loads the CA bundle on the loop)."""
    import asyncio

    cid = conn(monkeypatch, password=KEY, host="http://127.0.0.1:9")
    built = []
    real = AnthropicBatchAsyncHook._build

    async def counting(self):
        built.append(1)
        return await real(self)

    monkeypatch.setattr(AnthropicBatchAsyncHook, "_build", counting)
    hooks = [AnthropicBatchAsyncHook(cid) for _ in range(50)]
    clients = await asyncio.gather(*(h.get_async_client() for h in hooks))
    assert len(built) == 1 and len({id(c) for c in clients}) == 1
    for h in hooks[:-1]:
        await h.close()
    assert not clients[0].is_closed()
    await hooks[-1].close()
    assert clients[0].is_closed()
    again = AnthropicBatchAsyncHook(cid)
    assert await again.get_async_client() is not clients[0] and len(built) == 2
    await again.close()


async def test_the_shared_client_bounds_the_polls_in_flight(monkeypatch, batch_server_factory):
    """A thousand triggers polling at once queued a thousand requests in httpcore (which scans its queue on each
    assignment: 0.48 s of CPU in one loop iteration at N=1000, bench/bench_trigger.py); at most
    ASYNC_POOL_MAX_CONNECTIONS are in flight now, the rest wait on the loop."""
    import asyncio

    import airflow_provider_synth.hooks.anthropic as mod

    monkeypatch.setattr(mod, "ASYNC_POOL_MAX_CONNECTIONS", 3)
    server = batch_server_factory()
    cid = conn(monkeypatch, password=KEY, host=server.url)
    hooks = [AnthropicBatchAsyncHook(cid) for _ in range(12)]
    client = await hooks[0].get_async_client()
    in_flight, most = 0, 0
    real = client.messages.batches.with_raw_response.retrieve

    async def retrieve(batch_id, **kwargs):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.02)
            return await real(batch_id, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(client.messages.batches.with_raw_response, "retrieve", retrieve)
    batch = await client.messages.batches.create(requests=[{"custom_id": "a", "params": {
        "model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}}])
    try:
        states = await asyncio.gather(*(h.aget_batch_state(batch.id) for h in hooks))
    finally:
        for h in hooks:
            await h.close()
    assert {s["status"] for s in states} <= {"in_progress", "ended"} and len(states) == 12
    assert most == 3
