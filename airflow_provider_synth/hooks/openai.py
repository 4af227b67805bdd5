"""Hooks for the OpenAI and Azure OpenAI Batch API.

One connection turns into one SDK client through :meth:`OpenAIBatchHook._client_kwargs`, shared by the sync
hook (operators, sensors in poke mode) and :class:`OpenAIBatchAsyncHook` (triggers). The client class follows
the connection's type: ``synth_openai`` and the official provider's ``openai`` type build ``OpenAI``;
``synth_azure_openai`` builds ``AzureOpenAI`` (API key, or a Microsoft Entra ID token from ``azure-identity``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import os
import ssl
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import httpx2
import orjson
from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson
from airflow.providers.common.compat.sdk import BaseHook

from airflow_provider_synth.batch.jsonl import open_path
from airflow_provider_synth.batch.requests import UrlForm, service_url
from airflow_provider_synth.batch.status import IN_PROGRESS_STATUSES as IN_PROGRESS_STATUSES  # re-exported
from airflow_provider_synth.batch.status import TERMINAL_STATUSES as TERMINAL_STATUSES  # re-exported
from airflow_provider_synth.exceptions import ConnectionConfigError

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection
    from openai import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI
    from openai.types import Batch, FileDeleted, FileObject

CompletionWindow = Literal["24h"]
BatchEndpoint = Literal["/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/completions"]

OPENAI_CONN_TYPES = frozenset({"synth_openai", "openai"})
AZURE_CONN_TYPES = frozenset({"synth_azure_openai"})
#: The Entra ID scope Azure OpenAI accepts tokens for.
AZURE_TOKEN_SCOPE = "https://cognitiveservices.azure.com/.default"
#: Extras whose values are secrets: redacted from every message this module builds.
_SECRET_EXTRAS = ("client_secret", "api_key")
_DOWNLOAD_CHUNK = 1 << 20


def batch_summary(batch: Batch) -> dict[str, Any]:
    """Reduce a ``Batch`` to the JSON-primitive state that triggers, sensors and XCom carry.

    ``output_file_id`` is ``None`` for a batch whose every request failed: callers must read ``error_file_id``.

    :param batch: the SDK's ``Batch``.
    :return: ``{"status", "request_counts": {"total", "completed", "failed"}, "output_file_id",
        "error_file_id", "errors"}`` where ``errors`` lists the batch-level errors (e.g. validation) as strings.
    """
    counts = batch.request_counts
    errors = [
        f"{e.code or 'error'}: {e.message or ''}" + (f" (line {e.line})" if e.line is not None else "")
        for e in ((batch.errors.data or []) if batch.errors else [])
    ]
    return {
        "status": batch.status,
        "request_counts": {
            "total": counts.total if counts else 0,
            "completed": counts.completed if counts else 0,
            "failed": counts.failed if counts else 0,
        },
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "errors": errors[:20],
    }


def batch_state(data: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`batch_summary` of a batch's JSON as the API returns it, without building the SDK's ``Batch``.

    :param data: the decoded body of ``GET /batches/{batch_id}``.
    """
    counts = data.get("request_counts") or {}
    errors = [
        f"{e.get('code') or 'error'}: {e.get('message') or ''}"
        + (f" (line {e['line']})" if e.get("line") is not None else "")
        for e in ((data.get("errors") or {}).get("data") or [])
    ]
    return {
        "status": data["status"],
        "request_counts": {
            "total": counts.get("total", 0),
            "completed": counts.get("completed", 0),
            "failed": counts.get("failed", 0),
        },
        "output_file_id": data.get("output_file_id"),
        "error_file_id": data.get("error_file_id"),
        "errors": errors[:20],
    }


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context per process, built the way ``httpx2`` builds its default (``SSL_CERT_FILE`` honoured).

    Loading the CA bundle costs about 50 ms of CPU; an async client per trigger would pay it on the
    triggerer's event loop every time (5 s of lag for 100 triggers starting together).
    """
    return httpx2.create_ssl_context()


#: Requests one event loop's shared HTTP pool has in flight; more wait on a semaphore. Bounding them before
#: the pool matters: httpcore scans its whole request queue on every assignment (quadratic with 1,000 queued
#: polls), and thousands of simultaneous connects overflow a server's accept backlog.
ASYNC_POOL_MAX_CONNECTIONS = 100


class _LoopPool:
    """The HTTP client and in-flight limit shared by the async hooks of one event loop."""

    def __init__(self) -> None:
        # the SDK's aiohttp transport: about half the CPU per request of the httpx2 one under concurrency
        from openai import DefaultAioHttpClient
        from openai._vendor.httpx_aiohttp import AiohttpTransport

        limits = httpx2.Limits(
            max_connections=ASYNC_POOL_MAX_CONNECTIONS, max_keepalive_connections=ASYNC_POOL_MAX_CONNECTIONS
        )
        # our own aiohttp session under the SDK's transport, so that polls can also use it directly
        connector = aiohttp.TCPConnector(
            limit=ASYNC_POOL_MAX_CONNECTIONS, ssl=shared_ssl_context(), keepalive_timeout=limits.keepalive_expiry
        )
        self.session = aiohttp.ClientSession(connector=connector)
        transport = AiohttpTransport(client=self.session, verify=shared_ssl_context(), limits=limits)
        self.http_client: httpx2.AsyncClient = DefaultAioHttpClient(transport=transport)
        self.slots = asyncio.Semaphore(ASYNC_POOL_MAX_CONNECTIONS)
        self.clients: dict[str, _SharedClient] = {}
        #: hooks holding a shared client of this pool (stale ones past the TTL included)
        self.users = 0


#: Seconds a shared SDK client serves new hooks before the connection is looked up again (rotated keys).
SHARED_CLIENT_TTL_S = 300.0


class _SharedClient:
    """One connection's SDK client on one loop, shared by the async hooks of that ``conn_id`` while any is open.

    A thousand triggers starting together then make one connection lookup and build one client, instead of
    a thousand of each in the same loop iteration.
    """

    def __init__(self) -> None:
        self.ready: asyncio.Future[tuple[Any, Any, list[str], bool]] = asyncio.get_running_loop().create_future()
        self.created = time.monotonic()
        self.users = 0
        self.credential: Any = None
        #: ``(url prefix, headers, timeout)`` of direct polls, or ``None`` where only the SDK knows the auth
        self.direct: tuple[str, dict[str, str], aiohttp.ClientTimeout] | None = None


def _direct_poll(client: Any) -> tuple[str, dict[str, str], aiohttp.ClientTimeout] | None:
    """How to poll a batch without the SDK's request machinery, for a plain ``AsyncOpenAI`` with a static key.

    Azure clients, API-key providers, workload identity, custom auth or default query parameters return
    ``None``: their requests need the SDK. The SDK's private attributes are read defensively (an attribute
    that moved disables the direct path).
    """
    from openai import AsyncOpenAI

    absent = object()
    if type(client) is not AsyncOpenAI or client.default_query or client.custom_auth is not None:
        return None
    for name in ("_provider_runtime", "_api_key_provider", "workload_identity"):
        if getattr(client, name, absent) is not None:
            return None
    headers = {k: v for k, v in {**client.default_headers, **client.auth_headers}.items() if isinstance(v, str)}
    if "Authorization" not in headers:
        return None
    timeout = client.timeout
    if isinstance(timeout, httpx2.Timeout):
        client_timeout = aiohttp.ClientTimeout(sock_connect=timeout.connect, sock_read=timeout.read,
                                               connect=timeout.pool)
    else:
        client_timeout = aiohttp.ClientTimeout(total=float(timeout) if timeout is not None else None)
    return str(client.base_url).rstrip("/") + "/batches/", headers, client_timeout


_loop_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPool] = weakref.WeakKeyDictionary()


def _loop_pool() -> _LoopPool:
    """The running loop's shared pool: one set of kept-alive connections whatever the number of triggers.

    It holds no credentials: each hook's SDK client adds its own auth headers per request.
    """
    loop = asyncio.get_running_loop()
    pool = _loop_pools.get(loop)
    if pool is None or pool.http_client.is_closed:
        pool = _loop_pools[loop] = _LoopPool()
    return pool


async def close_loop_pool() -> None:
    """Close the running loop's shared HTTP pool (before the loop ends: scripts, tests). Hooks reopen one."""
    pool = _loop_pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.http_client.aclose()


def redact(text: str, secrets: list[str]) -> str:
    """Replace every occurrence of each secret in ``text`` with ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def token_provider_import_allowed() -> bool:
    """Whether the deployment lets connections name code to import (``[synth] allow_token_provider_import``).

    Read from the deployment's configuration on every use, never from the connection: the people who may
    edit connections are not always the people who may run code on workers and the triggerer.
    """
    from airflow.configuration import conf

    return conf.getboolean("synth", "allow_token_provider_import", fallback=False)


def _import_callable(path: str, conn_id: str) -> Callable[..., Any]:
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConnectionConfigError(f"Connection {conn_id!r}: cannot import {path!r}: {e}") from None
    if not callable(obj):
        raise ConnectionConfigError(f"Connection {conn_id!r}: {path!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _number(extras: Mapping[str, Any], key: str, kind: type[int] | type[float], conn_id: str) -> Any:
    value = extras.get(key)
    if value in (None, ""):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConnectionConfigError(
            f"Connection {conn_id!r}: extra {key!r} must be a number, got {value!r}"
        ) from None


class OpenAIBatchHook(BaseHook):
    """Interact with the OpenAI (or Azure OpenAI) Files and Batches API.

    The connection's type picks the client: ``synth_openai``/``openai`` build ``openai.OpenAI``,
    ``synth_azure_openai`` builds ``openai.AzureOpenAI``. Every method wraps one API call and returns the
    SDK's types; SDK errors (``openai.APIStatusError``...) propagate after the SDK's own retries
    (``max_retries`` extra).

    .. seealso:: :doc:`/connections` for every connection field.

    :param conn_id: id of a ``synth_openai``, ``synth_azure_openai`` or ``openai`` connection.
    :param client_options: extra keyword arguments for the SDK client constructor (``http_client``,
        ``default_headers``...), applied over the connection's settings. Never put secrets here.
    """

    conn_name_attr = "conn_id"
    default_conn_name = "synth_openai_default"
    conn_type = "synth_openai"
    hook_name = "OpenAI Batch (synth)"
    #: where the Entra ID credentials come from; the async hook takes ``azure.identity.aio``'s
    _azure_identity_module = "azure.identity"

    def __init__(
        self,
        conn_id: str = default_conn_name,
        *,
        client_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.client_options = dict(client_options or {})
        self._secrets: list[str] = []
        self._is_azure: bool | None = None
        self._credential: Any = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Connection form for Airflow versions that do not read ``conn-fields`` from the provider info."""
        return {
            "hidden_fields": ["schema", "port", "login"],
            "relabeling": {"password": "API Key", "host": "Base URL"},
            "placeholders": {
                "host": "https://api.openai.com/v1 (leave empty for OpenAI)",
                "extra": '{"organization": "org-...", "project": "proj_...", "timeout": 600, "max_retries": 5}',
            },
        }

    # -- connection -> client ---------------------------------------------------------------------------------

    def _client_kwargs(self, conn: Connection, extras: Mapping[str, Any]) -> dict[str, Any]:
        """Turn a connection and its extras into the SDK client's keyword arguments.

        The one place connection fields are read; the sync and async clients both come from it.
        Also records which secrets to redact and whether the connection is Azure.
        """
        conn_type = (conn.conn_type or "").replace("-", "_")
        # form fields may arrive prefixed (``extra__<conn_type>__<name>``) from older Airflow UIs
        prefix = f"extra__{conn_type}__"
        extras = {k.removeprefix(prefix): v for k, v in extras.items()}
        if conn_type in AZURE_CONN_TYPES:
            self._is_azure = True
            kwargs = self._azure_kwargs(conn, extras)
        elif conn_type in OPENAI_CONN_TYPES:
            self._is_azure = False
            kwargs = self._openai_kwargs(conn, extras)
        else:
            raise ConnectionConfigError(
                f"Connection {self.conn_id!r} has type {conn.conn_type!r}; expected one of "
                f"{sorted(OPENAI_CONN_TYPES | AZURE_CONN_TYPES)}"
            )
        timeout = _number(extras, "timeout", float, self.conn_id)
        max_retries = _number(extras, "max_retries", int, self.conn_id)
        if timeout is not None:
            kwargs["timeout"] = timeout
        if max_retries is not None:
            kwargs["max_retries"] = max_retries
        self._secrets = [s for s in [conn.password, *(str(extras.get(k) or "") for k in _SECRET_EXTRAS)] if s]
        if isinstance(kwargs.get("api_key"), str):
            self._secrets.append(kwargs["api_key"])
        kwargs.update(self.client_options)
        return kwargs

    def _openai_kwargs(self, conn: Connection, extras: Mapping[str, Any]) -> dict[str, Any]:
        if extras.get("auth_type", "api_key") != "api_key":
            raise ConnectionConfigError(
                f"Connection {self.conn_id!r}: auth_type {extras['auth_type']!r} is not supported; use an API key"
            )
        # the official provider's ``openai`` type keeps client settings in ``openai_client_kwargs``
        kwargs = dict(extras.get("openai_client_kwargs") or {})
        api_key = kwargs.pop("api_key", None) or conn.password
        base_url = kwargs.pop("base_url", None) or extras.get("base_url") or conn.host or None
        if not api_key:
            raise ConnectionConfigError(f"Connection {self.conn_id!r} has no API key (the password field)")
        kwargs["api_key"] = api_key
        if base_url:
            kwargs["base_url"] = base_url if "://" in base_url else f"https://{base_url}"
        for key in ("organization", "project"):
            if extras.get(key):
                kwargs[key] = extras[key]
        return kwargs

    def _azure_kwargs(self, conn: Connection, extras: Mapping[str, Any]) -> dict[str, Any]:
        endpoint = extras.get("azure_endpoint") or conn.host
        api_version = extras.get("api_version")
        if not endpoint:
            raise ConnectionConfigError(f"Connection {self.conn_id!r} has no Azure endpoint (the host field)")
        if not api_version:
            raise ConnectionConfigError(f"Connection {self.conn_id!r} has no 'api_version' extra")
        kwargs: dict[str, Any] = {
            "azure_endpoint": endpoint if "://" in endpoint else f"https://{endpoint}",
            "api_version": api_version,
        }
        if conn.password:
            kwargs["api_key"] = conn.password
        else:
            kwargs["azure_ad_token_provider"] = self._entra_token_provider(extras)
        return kwargs

    def _azure_credential_args(self, extras: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Pick the ``azure-identity`` credential class name and its arguments from the extras."""
        tenant_id, client_id, secret = (extras.get(k) for k in ("tenant_id", "client_id", "client_secret"))
        if tenant_id and client_id and secret:
            return "ClientSecretCredential", {"tenant_id": tenant_id, "client_id": client_id, "client_secret": secret}
        if secret:
            raise ConnectionConfigError(
                f"Connection {self.conn_id!r}: client_secret needs both tenant_id and client_id"
            )
        options = {}
        if extras.get("managed_identity_client_id") or client_id:
            options["managed_identity_client_id"] = extras.get("managed_identity_client_id") or client_id
        return "DefaultAzureCredential", options

    def _entra_token_provider(self, extras: Mapping[str, Any]) -> Callable[[], Any]:
        """A bearer-token provider for ``azure_ad_token_provider``: a custom callable or ``azure-identity``."""
        if extras.get("azure_ad_token_provider"):
            if not token_provider_import_allowed():
                raise ConnectionConfigError(
                    f"Connection {self.conn_id!r} names a Python callable in 'azure_ad_token_provider', and this "
                    "deployment does not import code named by connections. An administrator can allow it in "
                    "airflow.cfg ([synth] allow_token_provider_import = True, or the environment variable "
                    "AIRFLOW__SYNTH__ALLOW_TOKEN_PROVIDER_IMPORT=True); or use an API key or the Entra ID extras."
                )
            return _import_callable(str(extras["azure_ad_token_provider"]), self.conn_id)
        cls_name, args = self._azure_credential_args(extras)
        try:
            identity = importlib.import_module(self._azure_identity_module)
        except ImportError:
            raise ConnectionConfigError(
                "Microsoft Entra ID authentication needs azure-identity: "
                "pip install 'airflow-provider-synth[azure]'"
            ) from None
        self._credential = getattr(identity, cls_name)(**args)
        provider: Callable[[], Any] = identity.get_bearer_token_provider(
            self._credential, extras.get("token_scope") or AZURE_TOKEN_SCOPE
        )
        return provider

    def get_conn(self) -> OpenAI | AzureOpenAI:
        """Build the sync SDK client from the connection (one lookup, no network call)."""
        from openai import AzureOpenAI, OpenAI

        conn = self.get_connection(self.conn_id)
        kwargs = self._client_kwargs(conn, conn.extra_dejson)
        return AzureOpenAI(**kwargs) if self._is_azure else OpenAI(**kwargs)

    @cached_property
    def client(self) -> OpenAI | AzureOpenAI:
        """The sync SDK client, built on first use."""
        return self.get_conn()

    @cached_property
    def resource_id(self) -> str | None:
        """Azure only: the ARM id of the resource (extra ``resource_id``), for dashboard links."""
        extras = self.get_connection(self.conn_id).extra_dejson
        return extras.get("resource_id") or extras.get("extra__synth_azure_openai__resource_id") or None

    @property
    def is_azure(self) -> bool:
        """Whether the connection is an Azure OpenAI one (looks the connection up on first use)."""
        if self._is_azure is None:
            conn = self.get_connection(self.conn_id)
            self._is_azure = (conn.conn_type or "").replace("-", "_") in AZURE_CONN_TYPES
        return self._is_azure

    @property
    def url_form(self) -> UrlForm:
        """How this service spells endpoints in batch lines and ``batches.create``: ``openai``
        (``/v1/chat/completions``) or ``azure`` (``/chat/completions``, as Azure's docs write it)."""
        return "azure" if self.is_azure else "openai"

    def redact(self, text: str) -> str:
        """Remove this connection's secrets from ``text`` (for messages built from SDK errors)."""
        return redact(text, self._secrets)

    # -- files -----------------------------------------------------------------------------------------------

    def upload_file(
        self,
        path: Any,
        purpose: Literal["batch"] = "batch",
        *,
        filename: str | None = None,
        expires_after_s: int | None = None,
    ) -> FileObject:
        """Upload a file, streamed in chunks from a local path, URL or ``ObjectStoragePath``.

        :param path: local path, fsspec URL (``s3://...``) or ``ObjectStoragePath``.
        :param purpose: the file's purpose; ``batch`` for batch input.
        :param filename: name the API records; defaults to the path's last component.
        :param expires_after_s: the service deletes the file this many seconds after its creation
            (1 hour to 30 days); ``None`` keeps it until it is deleted.
        :return: the SDK's ``FileObject`` (its ``id`` is the ``input_file_id`` of a batch).
        """
        from openai import omit

        name = filename or os.path.basename(str(getattr(path, "path", path)).rstrip("/")) or "requests.jsonl"
        expiry = {"anchor": "created_at", "seconds": int(expires_after_s)} if expires_after_s else omit
        with open_path(path, "rb") as fp:
            # a (name, file object) tuple is streamed by the multipart encoder, and rewound on SDK retries;
            # a PathLike would be read whole into memory by the SDK
            return self.client.files.create(file=(name, fp, "application/jsonl"), purpose=purpose,
                                            expires_after=expiry)  # type: ignore[arg-type]

    def download_file(self, file_id: str, dest: Any) -> int:
        """Stream a file's content into ``dest`` (local path, URL or ``ObjectStoragePath``).

        :param file_id: the API file id (a batch's ``output_file_id`` or ``error_file_id``).
        :param dest: where to write; parent folders are created.
        :return: the number of bytes written.
        """
        written = 0
        with self.client.files.with_streaming_response.content(file_id) as response, open_path(dest, "wb") as out:
            for chunk in response.iter_bytes(_DOWNLOAD_CHUNK):
                out.write(chunk)
                written += len(chunk)
        return written

    def delete_file(self, file_id: str) -> FileDeleted:
        """Delete an uploaded or output file.

        :param file_id: the API file id.
        """
        return self.client.files.delete(file_id)

    def list_files(self, purpose: str | None = None) -> Iterator[FileObject]:
        """Iterate over the account's files, every page.

        :param purpose: only files with this purpose (``batch``, ``batch_output``...).
        """
        if purpose:
            yield from self.client.files.list(purpose=purpose)
        else:
            yield from self.client.files.list()

    # -- batches ---------------------------------------------------------------------------------------------

    def create_batch(
        self,
        input_file_id: str,
        endpoint: BatchEndpoint,
        completion_window: CompletionWindow = "24h",
        metadata: Mapping[str, str] | None = None,
        *,
        output_expires_after_s: int | None = None,
    ) -> Batch:
        """Create a batch over an uploaded JSONL file.

        :param input_file_id: id of a file uploaded with purpose ``batch``.
        :param endpoint: the endpoint every request line targets (``/v1/chat/completions``...); sent in the
            service's own form (:attr:`url_form`).
        :param completion_window: ``24h``, the only window the API offers.
        :param metadata: up to 16 string pairs; :meth:`find_batches` matches on them to re-attach.
        :param output_expires_after_s: the service deletes the batch's output and error files this many
            seconds after they are created (1 hour to 30 days); ``None`` keeps them until deleted.
        """
        from openai import omit

        expiry = {"anchor": "created_at", "seconds": int(output_expires_after_s)} if output_expires_after_s else omit
        return self.client.batches.create(
            input_file_id=input_file_id,
            endpoint=service_url(endpoint, self.url_form),  # type: ignore[arg-type]
            completion_window=completion_window,
            metadata=dict(metadata) if metadata else None,
            output_expires_after=expiry,  # type: ignore[arg-type]
        )

    def get_batch(self, batch_id: str) -> Batch:
        """Retrieve a batch.

        :param batch_id: the batch id.
        """
        return self.client.batches.retrieve(batch_id)

    def cancel_batch(self, batch_id: str) -> Batch:
        """Ask the API to cancel a batch; it passes through ``cancelling`` to ``cancelled``.

        :param batch_id: the batch id.
        """
        return self.client.batches.cancel(batch_id)

    def list_batches(self, *, page_size: int = 100) -> Iterator[Batch]:
        """Iterate over the account's batches, newest first, every page.

        :param page_size: batches fetched per API call.
        """
        yield from self.client.batches.list(limit=page_size)

    def find_batches(self, metadata: Mapping[str, str], *, created_after: float | None = None) -> list[Batch]:
        """Batches whose metadata contains every pair of ``metadata``: the way to re-attach after a retry.

        :param metadata: pairs that must all match (e.g. an idempotency key).
        :param created_after: epoch seconds; stop scanning at older batches (the list is newest first).
        :return: matching batches, newest first.
        """
        found = []
        for batch in self.list_batches():
            if created_after is not None and batch.created_at < created_after:
                break
            if batch.metadata and all(batch.metadata.get(k) == v for k, v in metadata.items()):
                found.append(batch)
        return found

    # -- synchronous requests --------------------------------------------------------------------------------

    def create_direct(self, url: str, body: Mapping[str, Any], *, custom_id: str | None = None) -> dict[str, Any]:
        """Send one request of a batch file through the synchronous API, at the direct price, with the SDK's
        retries (``max_retries``); the body is sent as written (fields the SDK's typed methods do not know
        included). On Azure the body's ``model`` is the deployment.

        :param url: the request line's ``url`` (``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/responses``,
            ``/v1/completions``).
        :param body: the request line's ``body``.
        :param custom_id: sent as ``X-Client-Request-Id``, so the request can be traced on the service's side.
        :return: the response body.
        :raises openai.APIStatusError: the service answered an error after the SDK's retries.
        """
        headers = {"X-Client-Request-Id": custom_id} if custom_id else {}
        path = url.removeprefix("/v1") if url.startswith("/v1/") else url
        result = self.client.post(path, cast_to=dict[str, Any], body=dict(body),  # type: ignore[call-overload]
                                  options={"headers": headers})
        return dict(result)

    def test_connection(self) -> tuple[bool, str]:
        """List the models: checks the credentials and spends nothing. The message never holds a secret."""
        try:
            self.client.models.list()
        except Exception as e:
            return False, self.redact(f"{type(e).__name__}: {e}")
        return True, "Connection successfully tested"


class AzureOpenAIBatchHook(OpenAIBatchHook):
    """:class:`OpenAIBatchHook` for ``synth_azure_openai`` connections (the connection form and default id).

    Batch request lines name the Azure *deployment* as their ``model``.

    :param conn_id: id of a ``synth_azure_openai`` connection.
    :param client_options: extra keyword arguments for the SDK client constructor.
    """

    default_conn_name = "synth_azure_openai_default"
    conn_type = "synth_azure_openai"
    hook_name = "Azure OpenAI Batch (synth)"

    def __init__(
        self,
        conn_id: str = default_conn_name,
        *,
        client_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id, client_options=client_options, **kwargs)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Connection form for Airflow versions that do not read ``conn-fields`` from the provider info."""
        return {
            "hidden_fields": ["schema", "port", "login"],
            "relabeling": {"password": "API Key (empty for Entra ID)", "host": "Azure endpoint"},
            "placeholders": {
                "host": "https://<resource>.openai.azure.com",
                "extra": '{"api_version": "2025-04-01-preview", "tenant_id": "...", "client_id": "...", '
                '"client_secret": "..."}',
            },
        }


class OpenAIBatchAsyncHook(OpenAIBatchHook):
    """The async side of :class:`OpenAIBatchHook`, for triggers: never blocks the event loop.

    The connection comes from the async lookup. Hooks of one ``conn_id`` on one event loop share one
    ``AsyncOpenAI``/``AsyncAzureOpenAI`` (and, for Entra ID, one async credential) while any of them is open,
    looked up again after :data:`SHARED_CLIENT_TTL_S`; all share one pooled HTTP client per loop with at most
    :data:`ASYNC_POOL_MAX_CONNECTIONS` requests in flight. So a thousand triggers make one lookup and open a
    bounded number of sockets. With ``client_options`` the hook builds and owns its own client.
    Use it as ``async with``, or call :meth:`close`.

    :param conn_id: id of a ``synth_openai``, ``synth_azure_openai`` or ``openai`` connection.
    :param client_options: extra keyword arguments for the async SDK client constructor.
    """

    # async credentials fetch tokens without blocking the loop; close() releases them
    _azure_identity_module = "azure.identity.aio"

    def __init__(
        self,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        *,
        client_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id, client_options=client_options, **kwargs)
        self._async_client: AsyncOpenAI | AsyncAzureOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None
        self._shared: _SharedClient | None = None
        self._pool: _LoopPool | None = None
        # concurrent first calls (a trigger polls its batches with gather) must attach one client, not several
        self._attach_lock = asyncio.Lock()

    async def get_async_client(self) -> AsyncOpenAI | AsyncAzureOpenAI:
        """The async SDK client: the loop's shared one for this connection, or the hook's own when
        ``client_options`` were given."""
        if self._async_client is None:
            async with self._attach_lock:
                if self._async_client is None and self.client_options:
                    self._async_client = await self._build_async_client(None)
                elif self._async_client is None:
                    await self._attach_shared_client()
        assert self._async_client is not None
        return self._async_client

    async def _build_async_client(self, http_client: httpx2.AsyncClient | None) -> AsyncOpenAI | AsyncAzureOpenAI:
        from openai import AsyncAzureOpenAI, AsyncOpenAI

        conn = await get_async_connection(self.conn_id, hook=self)
        kwargs = self._client_kwargs(conn, await get_async_extra_dejson(conn))
        if http_client is not None:
            kwargs["http_client"] = http_client
        return AsyncAzureOpenAI(**kwargs) if self._is_azure else AsyncOpenAI(**kwargs)

    async def _attach_shared_client(self) -> None:
        pool = _loop_pool()
        while True:
            entry = pool.clients.get(self.conn_id)
            if entry is None or time.monotonic() - entry.created > SHARED_CLIENT_TTL_S:
                entry = pool.clients[self.conn_id] = _SharedClient()
                entry.users += 1
                try:
                    client = await self._build_async_client(pool.http_client)
                except BaseException as error:
                    entry.users -= 1
                    if pool.clients.get(self.conn_id) is entry:
                        del pool.clients[self.conn_id]
                    if isinstance(error, asyncio.CancelledError):
                        entry.ready.cancel()
                    else:
                        entry.ready.set_exception(error)
                        entry.ready.exception()  # retrieved: waiters re-raise it, nobody else must log it
                    raise
                entry.credential, self._credential = self._credential, None
                entry.direct = _direct_poll(client)
                entry.ready.set_result((client, entry.credential, list(self._secrets), bool(self._is_azure)))
            else:
                entry.users += 1
            try:
                client, _, secrets, is_azure = await asyncio.shield(entry.ready)
            except asyncio.CancelledError:
                entry.users -= 1
                if entry.ready.cancelled():  # its creator was cancelled, not us: build it ourselves
                    continue
                raise
            except BaseException:
                entry.users -= 1
                raise
            break
        pool.users += 1
        self._shared, self._pool, self._slots = entry, pool, pool.slots
        self._async_client, self._secrets, self._is_azure = client, secrets, is_azure

    async def aget_batch(self, batch_id: str) -> Batch:
        """Retrieve a batch without blocking the loop.

        :param batch_id: the batch id.
        """
        client = await self.get_async_client()
        async with self._slots or contextlib.nullcontext():
            return await client.batches.retrieve(batch_id)

    async def aget_batch_state(self, batch_id: str) -> dict[str, Any]:
        """:func:`batch_summary` of a batch, retrieved with as few allocations as possible (triggers poll often).

        On the loop's shared client of a plain OpenAI connection the poll is one GET on the pooled aiohttp
        session, parsed by orjson; the SDK's request objects and pydantic ``Batch`` are not built. Those would
        survive into the oldest GC generation while a thousand polls are in flight and trigger full
        collections of the triggerer's heap (0.2 to 0.6 s pauses of the whole loop). Any other answer than
        200 with a batch, or any transport error, is retried once through the SDK (its retries, error types
        and messages); Azure and custom clients always use the SDK.

        :param batch_id: the batch id.
        """
        await self.get_async_client()
        pool, shared = self._pool, self._shared
        if pool is not None and shared is not None and shared.direct is not None:
            state = await self._direct_state(pool, shared.direct, batch_id)
            if state is not None:
                return state
        return batch_summary(await self.aget_batch(batch_id))

    async def _direct_state(
        self, pool: _LoopPool, direct: tuple[str, dict[str, str], aiohttp.ClientTimeout], batch_id: str
    ) -> dict[str, Any] | None:
        """The batch's state from one GET on the pool's aiohttp session; ``None`` for anything unexpected."""
        prefix, headers, timeout = direct
        data: Any = None
        try:
            async with self._slots or contextlib.nullcontext():
                url = prefix + urllib.parse.quote(batch_id, safe="")
                async with pool.session.get(url, headers=headers, timeout=timeout) as response:
                    if response.status == 200:
                        data = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return None
        if isinstance(data, dict) and isinstance(data.get("status"), str):
            return batch_state(data)
        return None

    async def acancel_batch(self, batch_id: str) -> Batch:
        """Cancel a batch without blocking the loop.

        :param batch_id: the batch id.
        """
        client = await self.get_async_client()
        async with self._slots or contextlib.nullcontext():
            return await client.batches.cancel(batch_id)

    async def close(self) -> None:
        """Release the client (idempotent): the hook's own is closed; a shared one when its last user leaves."""
        client, self._async_client = self._async_client, None
        credential, self._credential = self._credential, None
        shared, self._shared = self._shared, None
        pool, self._pool = self._pool, None
        self._slots = None
        if shared is not None and pool is not None:
            shared.users -= 1
            if shared.users == 0:
                credential = shared.credential
                if pool.clients.get(self.conn_id) is shared:
                    del pool.clients[self.conn_id]
            await self._release_pool(pool)
        elif client is not None:
            await client.close()
        if credential is not None:
            await credential.close()

    @staticmethod
    async def _release_pool(pool: _LoopPool) -> None:
        """Close the loop's HTTP pool when its last user leaves.

        A triggerer keeps its pool while any trigger waits; ``dag.test()`` and tests, which run each trigger
        in a fresh loop, leave no open connection behind.
        """
        pool.users -= 1
        if pool.users > 0:
            return
        loop = asyncio.get_running_loop()
        if _loop_pools.get(loop) is pool:
            del _loop_pools[loop]  # first, so a hook attaching meanwhile builds a new pool
        await pool.http_client.aclose()

    async def __aenter__(self) -> OpenAIBatchAsyncHook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
