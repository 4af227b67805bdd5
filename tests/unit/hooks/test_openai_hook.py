from __future__ import annotations

import asyncio
import json
import logging

import httpx2
import openai
import pytest
from airflow.sdk import Connection, ObjectStoragePath

from airflow_provider_synth.exceptions import ConnectionConfigError
from airflow_provider_synth.hooks.openai import (
    AZURE_TOKEN_SCOPE,
    AzureOpenAIBatchHook,
    OpenAIBatchAsyncHook,
    OpenAIBatchHook,
    batch_state,
    batch_summary,
)
from airflow_provider_synth.testing.mock_transport import FakeBatchAPI

API_KEY = "sk-test-SECRET-0123456789"


def set_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields) -> None:
    extra = fields.pop("extra", None)
    conn = Connection(conn_id=conn_id, extra=json.dumps(extra) if extra is not None else None, **fields)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", conn.as_json())


@pytest.fixture
def api() -> FakeBatchAPI:
    return FakeBatchAPI()


@pytest.fixture
def openai_conn(monkeypatch):
    set_conn(
        monkeypatch,
        "synth_openai_default",
        conn_type="synth_openai",
        password=API_KEY,
        host="http://fake.local/v1",
        extra={"organization": "org-1", "project": "proj-1", "timeout": "12.5", "max_retries": "0"},
    )
    return "synth_openai_default"


@pytest.fixture
def azure_conn(monkeypatch):
    set_conn(
        monkeypatch,
        "synth_azure_openai_default",
        conn_type="synth_azure_openai",
        password=API_KEY,
        host="https://res.openai.azure.com",
        extra={"api_version": "2025-04-01-preview", "max_retries": 0},
    )
    return "synth_azure_openai_default"


@pytest.fixture
def hook(api, openai_conn) -> OpenAIBatchHook:
    return OpenAIBatchHook(openai_conn, client_options={"http_client": api.sync_client()})


# -- connection -> client kwargs ------------------------------------------------------------------------------


def test_init_does_no_io(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("connection looked up in __init__")

    monkeypatch.setattr(OpenAIBatchHook, "get_connection", boom)
    import airflow_provider_synth.hooks.openai as mod

    monkeypatch.setattr(mod, "aget_connection", boom)
    hooks = [OpenAIBatchHook("anything"), OpenAIBatchAsyncHook("anything"), AzureOpenAIBatchHook()]
    assert [h.conn_id for h in hooks] == ["anything", "anything", AzureOpenAIBatchHook.default_conn_name]
    assert all("client" not in vars(h) for h in hooks), "no client built either"


def test_openai_client_kwargs(openai_conn):
    client = OpenAIBatchHook(openai_conn).client
    assert isinstance(client, openai.OpenAI) and not isinstance(client, openai.AzureOpenAI)
    assert client.api_key == API_KEY
    assert str(client.base_url) == "http://fake.local/v1/"
    assert (client.organization, client.project) == ("org-1", "proj-1")
    assert client.timeout == 12.5 and client.max_retries == 0


def test_official_openai_conn_type_works(monkeypatch):
    set_conn(
        monkeypatch,
        "openai_default",
        conn_type="openai",
        password=API_KEY,
        extra={"openai_client_kwargs": {"base_url": "http://other.local/v1", "max_retries": 7}},
    )
    client = OpenAIBatchHook("openai_default").client
    assert str(client.base_url) == "http://other.local/v1/"
    assert client.max_retries == 7 and client.api_key == API_KEY


def test_prefixed_form_extras_are_read(monkeypatch):
    set_conn(monkeypatch, "az", conn_type="synth_azure_openai", password=API_KEY, host="r.openai.azure.com",
             extra={"extra__synth_azure_openai__api_version": "2024-10-21",
                    "extra__synth_azure_openai__resource_id": "/subscriptions/s/x"})
    hook = AzureOpenAIBatchHook("az")
    assert hook.client._api_version == "2024-10-21"
    assert hook.resource_id == "/subscriptions/s/x"


def test_host_without_scheme_gets_https(monkeypatch):
    set_conn(monkeypatch, "c", conn_type="synth_openai", password=API_KEY, host="gateway.example.com/v1")
    assert str(OpenAIBatchHook("c").client.base_url) == "https://gateway.example.com/v1/"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"conn_type": "http", "password": API_KEY}, "has type 'http'"),
        ({"conn_type": "synth_openai"}, "no API key"),
        ({"conn_type": "synth_openai", "password": API_KEY, "extra": {"timeout": "soon"}}, "'timeout' must be"),
        ({"conn_type": "synth_azure_openai", "password": API_KEY}, "no Azure endpoint"),
        ({"conn_type": "synth_azure_openai", "host": "https://r.openai.azure.com"}, "no 'api_version'"),
        (
            {"conn_type": "synth_azure_openai", "host": "r", "extra": {"api_version": "v", "client_secret": "abcdef"}},
            "needs both tenant_id and client_id",
        ),
        (
            {"conn_type": "synth_azure_openai", "host": "r",
             "extra": {"api_version": "v", "azure_ad_token_provider": "nowhere.at_all"}},
            "cannot import 'nowhere.at_all'",
        ),
    ],
)
def test_bad_connections_raise_clear_errors(monkeypatch, fields, match):
    monkeypatch.setenv("AIRFLOW__SYNTH__ALLOW_TOKEN_PROVIDER_IMPORT", "True")
    set_conn(monkeypatch, "bad", **fields)
    with pytest.raises(ConnectionConfigError, match=match) as err:
        OpenAIBatchHook("bad").get_conn()
    assert API_KEY not in str(err.value) and "abcdef" not in str(err.value)


def test_azure_api_key_client(azure_conn):
    hook = AzureOpenAIBatchHook()
    client = hook.client
    assert isinstance(client, openai.AzureOpenAI)
    assert hook.is_azure
    assert client.api_key == API_KEY
    assert str(client.base_url) == "https://res.openai.azure.com/openai/"
    assert client._api_version == "2025-04-01-preview"


def fake_token() -> str:
    return "entra-token-123"


def test_azure_entra_custom_token_provider_sends_bearer(monkeypatch, api):
    monkeypatch.setenv("AIRFLOW__SYNTH__ALLOW_TOKEN_PROVIDER_IMPORT", "True")
    set_conn(
        monkeypatch,
        "az",
        conn_type="synth_azure_openai",
        host="https://res.openai.azure.com",
        extra={"api_version": "2025-04-01-preview", "azure_ad_token_provider": f"{__name__}.fake_token"},
    )
    hook = OpenAIBatchHook("az", client_options={"http_client": api.sync_client()})
    batch_id = api.add_batch(["in_progress"])
    assert hook.get_batch(batch_id).status == "in_progress"
    seen = api.seen[-1]
    assert seen.headers["authorization"] == "Bearer entra-token-123"
    assert seen.path == f"/openai/batches/{batch_id}"
    assert seen.query["api-version"] == "2025-04-01-preview"


@pytest.mark.parametrize(
    ("extra", "expected_cls", "expected_args"),
    [
        ({"tenant_id": "t", "client_id": "c", "client_secret": "s3cr3t!"}, "ClientSecretCredential",
         {"tenant_id": "t", "client_id": "c", "client_secret": "s3cr3t!"}),
        ({"managed_identity_client_id": "mi"}, "DefaultAzureCredential", {"managed_identity_client_id": "mi"}),
        ({}, "DefaultAzureCredential", {}),
    ],
)
@pytest.mark.parametrize("hook_cls", [OpenAIBatchHook, OpenAIBatchAsyncHook])
def test_azure_entra_credentials(monkeypatch, extra, expected_cls, expected_args, hook_cls):
    import azure.identity
    import azure.identity.aio

    module = azure.identity.aio if hook_cls is OpenAIBatchAsyncHook else azure.identity
    made = {}

    class FakeCredential:
        def __init__(self, **kwargs):
            made["args"] = kwargs

    def fake_provider(credential, scope):
        made["scope"] = scope
        return fake_token

    monkeypatch.setattr(module, expected_cls, FakeCredential)
    monkeypatch.setattr(module, "get_bearer_token_provider", fake_provider)
    set_conn(monkeypatch, "az", conn_type="synth_azure_openai", host="r.openai.azure.com",
             extra={"api_version": "2024-10-21", **extra})
    conn = hook_cls.get_connection("az")
    hook = hook_cls("az")
    kwargs = hook._client_kwargs(conn, conn.extra_dejson)
    assert kwargs["azure_ad_token_provider"] is fake_token
    assert "api_key" not in kwargs
    assert kwargs["azure_endpoint"] == "https://r.openai.azure.com"
    assert made == {"args": expected_args, "scope": AZURE_TOKEN_SCOPE}
    assert isinstance(hook._credential, FakeCredential)


# -- API calls through the SDK over the fake transport ----------------------------------------------------------


def test_upload_streams_from_object_storage_and_create_batch(hook, api, tmp_path):
    payload = b"".join(b'{"custom_id": "r%d", "method": "POST"}\n' % i for i in range(2000))
    src = ObjectStoragePath(f"file://{tmp_path}/in/requests.jsonl")
    src.parent.mkdir(parents=True)
    src.write_bytes(payload)

    file = hook.upload_file(src)
    assert file.filename == "requests.jsonl" and file.purpose == "batch"
    assert api.files[file.id]["content"] == payload

    batch = hook.create_batch(file.id, "/v1/chat/completions", metadata={"synth_key": "k1"})
    assert batch.input_file_id == file.id and batch.metadata == {"synth_key": "k1"}
    assert api.counters == {"files_created": 1, "batches_created": 1}
    seen = api.seen[-1]
    assert seen.headers["authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["openai-organization"] == "org-1"


def test_upload_does_not_read_whole_file(hook, api, tmp_path, monkeypatch):
    """The file object goes to the multipart encoder, which reads it in 64 KiB chunks."""
    src = tmp_path / "big.jsonl"
    src.write_bytes(b"x" * (1 << 20))
    sizes = []
    real_open = open

    class Spy:
        def __init__(self, fp):
            self.fp = fp

        def read(self, n=-1):
            sizes.append(n)
            return self.fp.read(n)

        def __getattr__(self, name):
            return getattr(self.fp, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fp.close()

    import airflow_provider_synth.hooks.openai as mod

    monkeypatch.setattr(mod, "open_path", lambda p, mode: Spy(real_open(p, mode)))
    hook.upload_file(str(src), filename="big.jsonl")
    assert sizes and all(0 < n <= 1 << 16 for n in sizes)
    assert api.files["file_000000"]["bytes"] == 1 << 20


def test_download_streams_into_object_storage(hook, api, tmp_path):
    api.files["file-out"] = {"id": "file-out", "object": "file", "bytes": 6, "created_at": 0,
                             "filename": "out.jsonl", "purpose": "batch_output", "content": b"a\nb\nc\n"}
    dest = ObjectStoragePath(f"file://{tmp_path}/deep/folder/out.jsonl")
    assert hook.download_file("file-out", dest) == 6
    assert dest.read_bytes() == b"a\nb\nc\n"
    local = tmp_path / "local.jsonl"
    hook.download_file("file-out", local)
    assert local.read_bytes() == b"a\nb\nc\n"


def test_get_cancel_delete_list(hook, api):
    batch_id = api.add_batch(["validating", "in_progress"])
    assert hook.get_batch(batch_id).status == "validating"
    assert hook.get_batch(batch_id).status == "in_progress"
    assert hook.cancel_batch(batch_id).status == "cancelling"
    assert hook.get_batch(batch_id).status == "cancelled"
    api.files["f1"] = {"id": "f1", "object": "file", "bytes": 1, "created_at": 0, "filename": "a",
                       "purpose": "batch", "content": b"x"}
    api.files["f2"] = {"id": "f2", "object": "file", "bytes": 1, "created_at": 0, "filename": "b",
                       "purpose": "batch_output", "content": b"x"}
    assert [f.id for f in hook.list_files(purpose="batch")] == ["f1"]
    assert hook.delete_file("f1").deleted
    assert [f.id for f in hook.list_files()] == ["f2"]


def test_list_and_find_batches_walk_every_page(hook, api):
    now = 1_700_000_000
    for i in range(250):
        api.add_batch(["completed"], created_at=now + i, metadata={"synth_key": f"k{i % 3}", "n": str(i)})
    assert len(list(hook.list_batches(page_size=40))) == 250
    found = hook.find_batches({"synth_key": "k1"})
    assert [b.metadata["n"] for b in found] == [str(i) for i in range(249, -1, -1) if i % 3 == 1]
    recent = hook.find_batches({"synth_key": "k1"}, created_after=now + 240)
    assert [b.metadata["n"] for b in recent] == ["247", "244", "241"]


def test_sdk_errors_propagate_after_sdk_retries(monkeypatch, api):
    set_conn(monkeypatch, "r", conn_type="synth_openai", password=API_KEY, host="http://fake.local/v1",
             extra={"max_retries": 2})
    hook = OpenAIBatchHook("r", client_options={"http_client": api.sync_client()})
    monkeypatch.setattr(openai._base_client.BaseClient, "_calculate_retry_timeout", lambda *a, **k: 0)
    batch_id = api.add_batch(["in_progress"])
    api.fail_next(500, 503)
    assert hook.get_batch(batch_id).status == "in_progress"
    api.fail_next(500, 500, 500)
    with pytest.raises(openai.InternalServerError):
        hook.get_batch(batch_id)


def test_test_connection_lists_models_and_hides_secret(hook, api, monkeypatch):
    assert hook.test_connection() == (True, "Connection successfully tested")
    assert api.seen[-1].path == "/v1/models" and api.seen[-1].method == "GET"
    assert api.counters == {}

    def leaky(request):
        return httpx2.Response(401, json={"error": {"message": f"Incorrect API key provided: {API_KEY}"}})

    monkeypatch.setattr(api, "handle", leaky)
    hook2 = OpenAIBatchHook(hook.conn_id, client_options={"http_client": api.sync_client()})
    ok, message = hook2.test_connection()
    assert not ok and "AuthenticationError" in message and "***" in message
    assert API_KEY not in message


def test_batch_summary_shapes():
    from openai.types import Batch

    payload = {"id": "b1", "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "f",
               "completion_window": "24h", "status": "completed", "created_at": 0,
               "request_counts": {"total": 3, "completed": 0, "failed": 3},
               "output_file_id": None, "error_file_id": "file-err",
               "errors": {"object": "list", "data": [{"code": "invalid_json", "message": "bad", "line": 2},
                                                     {"code": None, "message": None, "line": None}]}}
    batch = Batch.model_validate(payload)
    assert batch_summary(batch) == {
        "status": "completed",
        "request_counts": {"total": 3, "completed": 0, "failed": 3},
        "output_file_id": None,
        "error_file_id": "file-err",
        "errors": ["invalid_json: bad (line 2)", "error: "],
        "usage": None,
        "model": None,
    }
    # the trigger's direct polls build the same state from the JSON, without the SDK's model
    assert batch_state(payload) == batch_summary(batch)
    bare = {**payload, "status": "validating", "request_counts": None, "errors": None, "error_file_id": None}
    assert batch_state(bare) == batch_summary(Batch.model_validate(bare)) == {
        "status": "validating", "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "output_file_id": None, "error_file_id": None, "errors": [], "usage": None, "model": None,
    }
    # the service's own usage and model, in the core's names
    usage = {"input_tokens": 120, "input_tokens_details": {"cached_tokens": 20}, "output_tokens": 40,
             "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 160}
    billed = {**payload, "usage": usage, "model": "gpt-4o-mini-2024-07-18"}
    assert batch_state(billed) == batch_summary(Batch.model_validate(billed))
    assert batch_state(billed)["usage"] == {"prompt_tokens": 120, "cached_tokens": 20, "completion_tokens": 40,
                                            "reasoning_tokens": 5, "total_tokens": 160}
    assert batch_state(billed)["model"] == "gpt-4o-mini-2024-07-18"


# -- async hook -------------------------------------------------------------------------------------------------


async def test_async_hook_uses_async_lookup_and_closes(monkeypatch, api, openai_conn, caplog):
    def no_sync(*a, **k):
        raise AssertionError("sync connection lookup on the event loop")

    monkeypatch.setattr(OpenAIBatchHook, "get_connection", classmethod(no_sync))
    batch_id = api.add_batch(["in_progress", "completed"])
    caplog.set_level(logging.DEBUG)
    async with OpenAIBatchAsyncHook(openai_conn, client_options={"http_client": api.async_client()}) as hook:
        assert (await hook.aget_batch(batch_id)).status == "in_progress"
        client = hook._async_client
        assert isinstance(client, openai.AsyncOpenAI)
        assert (await hook.aget_batch(batch_id)).status == "completed"
        assert hook._async_client is client  # one client for the hook's life
        assert (await hook.acancel_batch(batch_id)).status == "cancelling"
    assert hook._async_client is None and client.is_closed()
    await hook.close()  # idempotent
    assert API_KEY not in caplog.text


async def test_async_hook_azure(api, azure_conn):
    hook = OpenAIBatchAsyncHook(azure_conn, client_options={"http_client": api.async_client()})
    batch_id = api.add_batch(["finalizing"])
    try:
        assert (await hook.aget_batch(batch_id)).status == "finalizing"
        assert isinstance(hook._async_client, openai.AsyncAzureOpenAI)
        assert api.seen[-1].headers["api-key"] == API_KEY
    finally:
        await hook.close()


async def test_async_hook_closes_entra_credential(monkeypatch, api):
    import azure.identity.aio

    closed = []

    class FakeCredential:
        def __init__(self, **kwargs):
            pass

        async def close(self):
            closed.append(True)

    async def token():
        return "async-token"

    monkeypatch.setattr(azure.identity.aio, "DefaultAzureCredential", FakeCredential)
    monkeypatch.setattr(azure.identity.aio, "get_bearer_token_provider", lambda cred, scope: token)
    set_conn(monkeypatch, "az", conn_type="synth_azure_openai", host="https://r.openai.azure.com",
             extra={"api_version": "2024-10-21"})
    hook = OpenAIBatchAsyncHook("az", client_options={"http_client": api.async_client()})
    batch_id = api.add_batch(["in_progress"])
    await hook.aget_batch(batch_id)
    assert api.seen[-1].headers["authorization"] == "Bearer async-token"
    await hook.close()
    assert closed == [True]


def count_lookups(monkeypatch) -> list[str]:
    """The async connection lookups the hooks make (each takes 10 ms, so concurrent callers overlap)."""
    import airflow_provider_synth.hooks.openai as mod

    lookups: list[str] = []
    real_lookup = mod.aget_connection

    async def counting_lookup(conn_id, hook=None):
        lookups.append(conn_id)
        await asyncio.sleep(0.01)
        return await real_lookup(conn_id, hook=hook)

    monkeypatch.setattr(mod, "aget_connection", counting_lookup)
    return lookups


@pytest.fixture
def fresh_masker():
    """Airflow's masker with no secrets learnt by earlier tests, restored afterwards.

    Its replacer is one regex alternation over a set of patterns, so a secret another test registered that is a
    prefix of this test's key ("sk-test", from an in-process DAG run) can win the match and leave the rest of the
    key in the text, depending on set order: the check below is only about what *this* lookup registered.
    """
    from airflow.sdk._shared.secrets_masker import _secrets_masker

    masker = _secrets_masker()
    patterns, replacer = set(masker.patterns), masker.replacer
    masker.reset_masker()
    yield masker
    masker.patterns, masker.replacer = patterns, replacer


async def test_async_hooks_share_one_client_per_connection_and_loop(openai_conn, monkeypatch, fresh_masker):
    from airflow.providers.common.compat.sdk import redact

    import airflow_provider_synth.hooks.openai_pool as pool_mod

    assert API_KEY in redact(f"key {API_KEY}")  # not learnt yet
    lookups = count_lookups(monkeypatch)
    hooks = [OpenAIBatchAsyncHook(openai_conn) for _ in range(50)]
    try:
        clients = await asyncio.gather(*(h.get_async_client() for h in hooks))
        assert len(lookups) == 1 and len({id(c) for c in clients}) == 1  # one lookup, one client
        assert clients[0]._client is pool_mod.loop_pool().http_client
        assert hooks[0]._slots()._value == pool_mod.ASYNC_POOL_MAX_CONNECTIONS
        assert redact(f"key {API_KEY}") == "key ***"  # Airflow's masker learnt the key at the lookup
        for hook in hooks[:-1]:
            await hook.close()
        assert pool_mod.loop_pool().clients[openai_conn].users == 1  # the last user keeps it
        http_client = clients[0]._client
        await hooks[-1].close()
        assert asyncio.get_running_loop() not in pool_mod._loop_pools  # last client gone: pool closed
        assert http_client.is_closed
        again = OpenAIBatchAsyncHook(openai_conn)
        await again.get_async_client()
        assert len(lookups) == 2  # released when its last user left: looked up again
        monkeypatch.setattr(pool_mod, "SHARED_CLIENT_TTL_S", 0.0)
        await OpenAIBatchAsyncHook(openai_conn).get_async_client()
        assert len(lookups) == 3  # past the TTL: looked up again (rotated keys)
        assert len(pool_mod.loop_pool().clients) == 1 and not again._async_client._client.is_closed
        stale = pool_mod.loop_pool().clients[openai_conn]
        newer = OpenAIBatchAsyncHook(openai_conn)
        await newer.get_async_client()  # past the TTL again: a new entry replaces the one `again` holds
        assert pool_mod.loop_pool().clients[openai_conn] is not stale
        await newer.close()
        # `again` still holds the stale client: the pool stays open for it
        assert not again._async_client._client.is_closed
    finally:
        await pool_mod.close_loop_pool()


async def test_shared_client_failure_reaches_every_waiter_then_retries(monkeypatch):
    set_conn(monkeypatch, "nokey", conn_type="synth_openai")
    from airflow_provider_synth.hooks.openai_pool import close_loop_pool

    hooks = [OpenAIBatchAsyncHook("nokey") for _ in range(5)]
    results = await asyncio.gather(*(h.get_async_client() for h in hooks), return_exceptions=True)
    assert all(isinstance(r, ConnectionConfigError) for r in results)
    set_conn(monkeypatch, "nokey", conn_type="synth_openai", password=API_KEY)
    try:
        assert await OpenAIBatchAsyncHook("nokey").get_async_client()  # not stuck on the failed attempt
    finally:
        await close_loop_pool()


async def test_shared_entra_credential_closed_by_last_user(monkeypatch):
    import azure.identity.aio

    from airflow_provider_synth.hooks.openai_pool import close_loop_pool

    closed = []

    class FakeCredential:
        def __init__(self, **kwargs):
            pass

        async def close(self):
            closed.append(True)

    monkeypatch.setattr(azure.identity.aio, "DefaultAzureCredential", FakeCredential)
    monkeypatch.setattr(azure.identity.aio, "get_bearer_token_provider", lambda cred, scope: lambda: "t")
    set_conn(monkeypatch, "az", conn_type="synth_azure_openai", host="https://r.openai.azure.com",
             extra={"api_version": "2024-10-21"})
    first, second = OpenAIBatchAsyncHook("az"), OpenAIBatchAsyncHook("az")
    try:
        assert await first.get_async_client() is await second.get_async_client()
        await first.close()
        assert closed == []
        await second.close()
        assert closed == [True]
    finally:
        await close_loop_pool()


def test_upload_and_download_through_an_fsspec_url(hook, api):
    """A non-local filesystem URL (memory:// here, s3:// in production) streams both ways."""
    import fsspec

    fs = fsspec.filesystem("memory")
    payload = b'{"custom_id": "a"}\n' * 1000
    fs.pipe("/synth-hook-test/in/requests.jsonl", payload)
    file = hook.upload_file("memory://synth-hook-test/in/requests.jsonl")
    assert api.files[file.id]["content"] == payload and file.filename == "requests.jsonl"
    assert hook.download_file(file.id, "memory://synth-hook-test/out/copy.jsonl") == len(payload)
    assert fs.cat("/synth-hook-test/out/copy.jsonl") == payload


async def test_concurrent_first_calls_attach_one_client(openai_conn, api, monkeypatch):
    """A trigger polls its batches with gather: the hook's first calls race to build the client."""
    import airflow_provider_synth.hooks.openai_pool as pool_mod

    lookups = count_lookups(monkeypatch)
    shared = OpenAIBatchAsyncHook(openai_conn)
    clients = await asyncio.gather(*(shared.get_async_client() for _ in range(5)))
    assert len(lookups) == 1 and len({id(c) for c in clients}) == 1
    assert pool_mod.loop_pool().users == 1
    await shared.close()
    assert asyncio.get_running_loop() not in pool_mod._loop_pools  # released: nothing left open

    own = OpenAIBatchAsyncHook(openai_conn, client_options={"http_client": api.async_client()})
    clients = await asyncio.gather(*(own.get_async_client() for _ in range(5)))
    assert len(lookups) == 2 and len({id(c) for c in clients}) == 1
    await own.close()
