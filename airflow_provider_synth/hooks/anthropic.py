"""Hooks for Anthropic's Message Batches API, on the official anthropic provider's ``anthropic`` connection.

The connection is read as that provider reads it: the API key in the password, an optional base URL in the
host (a gateway, a proxy, the local server), and SDK client settings in the extra ``anthropic_client_kwargs``
(``base_url``, ``api_key``, ``timeout``, ``max_retries``, ``default_headers``...). One extra of this provider's
own is read as well: ``api_version``, the ``anthropic-version`` header the requests are sent with (default: the
SDK's own, ``2026-10-21`` for SDK 2.x), which decides how OpenAI lines are translated
(:class:`~airflow_provider_synth.runs.anthropic_messages.Translation`).

Message Batches are a first-party API: a connection whose ``platform`` extra names Bedrock, Vertex AI or
Foundry is refused (use the Bedrock backend for Claude on Bedrock).

The module imports neither the SDK nor anything heavy at import time: the trigger module imports it inside the
triggerer's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Iterator, Mapping
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.connection import get_async_extra_dejson
from airflow.providers.common.compat.sdk import BaseHook, redact

from airflow_provider_synth._compat import aget_connection
from airflow_provider_synth.batch.paths import open_path
from airflow_provider_synth.batch.results import is_transient_status
from airflow_provider_synth.batch.status import Waited
from airflow_provider_synth.exceptions import ConnectionConfigError

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection
    from anthropic import Anthropic, AsyncAnthropic
    from anthropic.types.messages import MessageBatch

#: ``processing_status`` -> finished for good; ``canceling`` still runs (it ends with partial results).
MESSAGE_BATCH_PHASES: Mapping[str | None, bool] = {None: False, "in_progress": False, "canceling": False,
                                                   "ended": True}
#: What the trigger and the run wait for. This module imports no SDK at import time, so the trigger module
#: (imported inside the triggerer's event loop) can take it from here.
MESSAGE_BATCHES = Waited("message batch", "message batches", MESSAGE_BATCH_PHASES)
#: the official anthropic provider's connection type, read unchanged
CONN_TYPE = "anthropic"
#: the platforms that serve Message Batches (the official provider's FIRST_PARTY_PLATFORMS)
FIRST_PARTY_PLATFORMS = frozenset({"anthropic", "aws"})
_CHUNK = 1 << 20
COUNT_KEYS = ("processing", "succeeded", "errored", "canceled", "expired")


def is_transient(error: BaseException) -> bool:
    """Whether a polling error may go away by itself: the network, a timeout, or an HTTP status of THE
    transient table (:data:`~airflow_provider_synth.batch.results.TRANSIENT_HTTP_STATUSES`: 429, 529, 5xx...).

    :param error: what a call of the hook raised.
    """
    import anthropic

    if isinstance(error, anthropic.APIConnectionError):  # APITimeoutError included
        return True
    return isinstance(error, anthropic.APIStatusError) and is_transient_status(error.status_code)


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def batch_state(batch: MessageBatch | Mapping[str, Any]) -> dict[str, Any]:
    """A ``MessageBatch`` (or its JSON, as the API returns it) as the JSON-primitive state triggers, runs and
    XCom carry: ``{"status", "request_counts": {processing, succeeded, errored, canceled, expired, total},
    "created_at", "ended_at", "results_url"}`` (times in epoch seconds or RFC 3339, for display only)."""
    if isinstance(batch, Mapping):
        raw = batch.get("request_counts") or {}
        counts = {k: int(raw.get(k) or 0) for k in COUNT_KEYS}
        created, ended = batch.get("created_at"), batch.get("ended_at")
        status, url = batch.get("processing_status"), batch.get("results_url")
    else:
        counts = {k: int(getattr(batch.request_counts, k, 0) or 0) for k in COUNT_KEYS}
        created, ended = _epoch(batch.created_at), _epoch(batch.ended_at)
        status, url = batch.processing_status, batch.results_url
    counts["total"] = sum(counts.values())
    return {"status": status, "request_counts": counts, "created_at": created, "ended_at": ended,
            "results_url": url}


class AnthropicBatchHook(BaseHook):
    """Interact with Anthropic's Message Batches API through the official ``anthropic`` connection type.

    Every method wraps one API call and returns the SDK's types; SDK errors (``anthropic.APIStatusError``...)
    propagate after the SDK's own retries (``anthropic_client_kwargs.max_retries``).

    .. seealso:: :doc:`/operators/anthropic` for the connection's fields.

    :param conn_id: id of an ``anthropic`` connection.
    :param client_options: extra keyword arguments for the SDK client (``http_client``...), applied over the
        connection's settings. Never put secrets here.
    """

    # the connection type (and its form) is the official anthropic provider's: this hook declares none
    conn_name_attr = "conn_id"
    default_conn_name = "anthropic_default"

    def __init__(self, conn_id: str = default_conn_name, *, client_options: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.client_options = dict(client_options or {})
        self._api_version: str | None = None

    # -- connection -> client -----------------------------------------------------------------------------------

    def _client_kwargs(self, conn: Connection, extras: Mapping[str, Any]) -> dict[str, Any]:
        """The SDK client's keyword arguments from a connection: the one place its fields are read (the sync
        and the async client both come from here)."""
        if (conn.conn_type or "") != CONN_TYPE:
            raise ConnectionConfigError(f"Connection {self.conn_id!r} has type {conn.conn_type!r}; expected "
                                        f"{CONN_TYPE!r} (the official anthropic provider's)")
        platform = str(extras.get("platform") or "anthropic").lower()
        if platform not in FIRST_PARTY_PLATFORMS:
            raise ConnectionConfigError(
                f"Connection {self.conn_id!r} is for the {platform!r} platform, which does not serve Message "
                "Batches (a first-party API); use an 'anthropic' platform connection, or the Bedrock backend")
        kwargs = dict(extras.get("anthropic_client_kwargs") or {})
        api_key = kwargs.pop("api_key", None) or conn.password
        base_url = kwargs.pop("base_url", None) or conn.host or None
        if not api_key:
            raise ConnectionConfigError(f"Connection {self.conn_id!r} has no API key (the password field)")
        kwargs["api_key"] = api_key
        if base_url:
            kwargs["base_url"] = base_url if "://" in base_url else f"https://{base_url}"
        headers = dict(kwargs.pop("default_headers", None) or {})
        if extras.get("api_version"):
            headers["anthropic-version"] = str(extras["api_version"])
        if headers:
            kwargs["default_headers"] = headers
        self._api_version = headers.get("anthropic-version")
        kwargs.update(self.client_options)
        return kwargs

    def get_conn(self) -> Anthropic:
        """Build the sync SDK client from the connection (one lookup, no network call)."""
        from anthropic import Anthropic

        conn = self.get_connection(self.conn_id)
        return Anthropic(**self._client_kwargs(conn, conn.extra_dejson))

    @cached_property
    def client(self) -> Anthropic:
        """The sync SDK client, built on first use."""
        return self.get_conn()

    @property
    def api_version(self) -> str:
        """The ``anthropic-version`` the requests are sent with (the connection's, else the SDK's own)."""
        return str(self.client.default_headers.get("anthropic-version") or self._api_version or "")

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    # -- batches --------------------------------------------------------------------------------------------

    def create_batch(self, requests: list[dict[str, Any]]) -> MessageBatch:
        """Create a Message Batch.

        :param requests: ``[{"custom_id", "params"}]`` (at most 100,000, 256 MB).
        """
        return self.client.messages.batches.create(requests=requests)  # type: ignore[arg-type]

    def get_batch(self, batch_id: str) -> MessageBatch:
        """Retrieve a batch.

        :param batch_id: the batch id.
        """
        return self.client.messages.batches.retrieve(batch_id)

    def cancel_batch(self, batch_id: str) -> MessageBatch:
        """Ask the API to cancel a batch: it goes through ``canceling`` to ``ended``, keeping what finished.

        :param batch_id: the batch id.
        """
        return self.client.messages.batches.cancel(batch_id)

    def list_batches(self, *, created_after: float | None = None, page_size: int = 100) -> Iterator[MessageBatch]:
        """The workspace's batches, newest first, every page (stops at the first one older than
        ``created_after``, epoch seconds).

        :param created_after: stop scanning at older batches.
        :param page_size: batches fetched per call.
        """
        for batch in self.client.messages.batches.list(limit=page_size):
            if created_after is not None and batch.created_at.timestamp() < created_after:
                return
            yield batch

    def download_results(self, batch_id: str, dest: Any) -> tuple[int, int]:
        """Stream an ended batch's results JSONL, byte for byte, into ``dest``.

        :param batch_id: the batch id.
        :param dest: a local path, URL or ``ObjectStoragePath``.
        :return: (bytes, lines) written.
        """
        decoder = self.client.messages.batches.results(batch_id)
        written = lines = 0
        last = b"\n"
        try:
            with open_path(dest, "wb") as out:
                for chunk in decoder.http_response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    lines += chunk.count(b"\n")
                    last = chunk[-1:] or last
                if last != b"\n" and written:
                    out.write(b"\n")
                    written += 1
                    lines += 1
        finally:
            decoder.close()
        return written, lines

    def test_connection(self) -> tuple[bool, str]:
        """List one batch: checks the credentials and spends nothing. The message never holds a secret."""
        try:
            self.client.messages.batches.list(limit=1)
        except Exception as e:
            return False, str(redact(f"{type(e).__name__}: {e}"))
        return True, "Connection successfully tested"


#: Seconds a shared async client serves new hooks before the connection is looked up again (rotated keys).
SHARED_CLIENT_TTL_S = 300.0
#: Polls one shared async client has in flight; more wait on a semaphore (the OpenAI pool's bound).
ASYNC_POOL_MAX_CONNECTIONS = 100


class _Shared:
    """One connection's ``AsyncAnthropic`` on one event loop, leased by every async hook of that ``conn_id``."""

    def __init__(self) -> None:
        self.ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.created = time.monotonic()
        self.users = 0
        #: polls in flight on the shared client, at most ASYNC_POOL_MAX_CONNECTIONS (as the OpenAI pool): a
        #: thousand queued in httpcore at once are scanned on every assignment, quadratic CPU on the loop
        self.slots = asyncio.Semaphore(ASYNC_POOL_MAX_CONNECTIONS)


#: event loop -> conn_id -> its shared client
_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Shared]] = weakref.WeakKeyDictionary()


class AnthropicBatchAsyncHook(AnthropicBatchHook):
    """The async side of :class:`AnthropicBatchHook`, for triggers: never blocks the event loop.

    The connection comes from the async lookup. The hooks of one ``conn_id`` on one event loop lease one shared
    ``AsyncAnthropic`` (over one TLS context per process): a triggerer starting a hundred triggers makes one
    lookup and one client instead of a hundred (each client loads the CA bundle, about 50 ms of CPU on the loop).
    With ``client_options`` the hook builds and owns its own client. Use it as ``async with``, or call
    :meth:`close`.

    :param conn_id: id of an ``anthropic`` connection.
    :param client_options: extra keyword arguments for the async SDK client.
    """

    def __init__(self, conn_id: str = AnthropicBatchHook.default_conn_name, *,
                 client_options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(conn_id, client_options=client_options, **kwargs)
        self._async_client: AsyncAnthropic | None = None
        self._shared: _Shared | None = None

    async def _build(self) -> AsyncAnthropic:
        from anthropic import AsyncAnthropic, DefaultAsyncHttpxClient

        conn = await aget_connection(self.conn_id, hook=self)
        kwargs = self._client_kwargs(conn, await get_async_extra_dejson(conn))
        if "http_client" not in kwargs:
            from airflow_provider_synth.hooks.openai_pool import shared_ssl_context

            kwargs["http_client"] = DefaultAsyncHttpxClient(verify=shared_ssl_context())
        return AsyncAnthropic(**kwargs)

    async def get_async_client(self) -> AsyncAnthropic:
        """The async SDK client: the loop's shared one for this connection, or the hook's own when
        ``client_options`` were given."""
        if self._async_client is not None:
            return self._async_client
        if self.client_options:
            self._async_client = await self._build()
            return self._async_client
        entries = _SHARED.setdefault(asyncio.get_running_loop(), {})
        entry = entries.get(self.conn_id)
        if entry is None or time.monotonic() - entry.created > SHARED_CLIENT_TTL_S or (
                entry.ready.done() and entry.ready.exception() is not None):
            entry = entries[self.conn_id] = _Shared()
            try:
                entry.ready.set_result(await self._build())
            except BaseException as exc:
                entry.ready.set_exception(exc)
                entries.pop(self.conn_id, None)
                raise
        entry.users += 1
        self._shared = entry
        try:
            client: AsyncAnthropic = await asyncio.shield(entry.ready)
        except BaseException:
            self._shared, entry.users = None, entry.users - 1
            raise
        self._async_client = client
        return client

    async def aget_batch_state(self, batch_id: str) -> dict[str, Any]:
        """:func:`batch_state` of a batch, without blocking the loop.

        :param batch_id: the batch id.
        """
        client = await self.get_async_client()
        # the raw answer, parsed by orjson: a trigger polls often, and the SDK's pydantic MessageBatch costs
        # CPU on the triggerer's loop for every poll of every batch (the SDK's status errors still raise)
        async with self._shared.slots if self._shared is not None else contextlib.nullcontext():
            raw = await client.messages.batches.with_raw_response.retrieve(batch_id)
        import orjson

        return batch_state(orjson.loads(raw.http_response.content))

    async def acancel_batch(self, batch_id: str) -> MessageBatch:
        """Cancel a batch without blocking the loop.

        :param batch_id: the batch id.
        """
        client = await self.get_async_client()
        return await client.messages.batches.cancel(batch_id)

    async def close(self) -> None:
        """Release the client (idempotent): the hook's own is closed; a shared one when its last user leaves."""
        client, self._async_client = self._async_client, None
        entry, self._shared = self._shared, None
        if entry is not None:
            entry.users -= 1
            entries = _SHARED.get(asyncio.get_running_loop(), {})
            if entry.users > 0:
                return
            if entries.get(self.conn_id) is entry:
                entries.pop(self.conn_id)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def __aenter__(self) -> AnthropicBatchAsyncHook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
