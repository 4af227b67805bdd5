"""The triggerer's side of :class:`~airflow_provider_synth.hooks.openai.OpenAIBatchAsyncHook`: sharing and speed.

A triggerer may hold a thousand waiting batches in one event loop. This module keeps that cheap:

* one HTTP pool per event loop (:class:`LoopPool`) with at most :data:`ASYNC_POOL_MAX_CONNECTIONS` requests in
  flight, and one TLS context per process (:func:`shared_ssl_context`);
* one SDK client per connection and loop (:class:`SharedClient`), leased by every hook of that ``conn_id``
  (:func:`lease`, :func:`release`) and looked up again after :data:`SHARED_CLIENT_TTL_S`;
* a poll without the SDK's request machinery (:func:`direct_batch_state`) for plain OpenAI connections with a
  static key: one GET, parsed by orjson, no pydantic ``Batch``.

Public APIs of openai, httpx2 and aiohttp only.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
import orjson

#: Requests one event loop's shared HTTP pool has in flight; more wait on a semaphore. Bounding them before
#: the pool matters: httpcore scans its whole request queue on every assignment (quadratic with 1,000 queued
#: polls), and thousands of simultaneous connects overflow a server's accept backlog.
ASYNC_POOL_MAX_CONNECTIONS = 100
#: Seconds a shared SDK client serves new hooks before the connection is looked up again (rotated keys).
SHARED_CLIENT_TTL_S = 300.0
#: Client settings under which a poll needs nothing the SDK adds beyond its headers: a static API key.
_DIRECT_SAFE_KWARGS = frozenset(
    {"api_key", "base_url", "organization", "project", "timeout", "max_retries", "http_client", "default_headers"}
)


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context per process, built the way ``httpx2`` builds its default (``SSL_CERT_FILE`` honoured).

    Loading the CA bundle costs about 50 ms of CPU; an async client per trigger would pay it on the
    triggerer's event loop every time (5 s of lag for 100 triggers starting together).
    """
    return httpx2.create_ssl_context()


@dataclass(frozen=True)
class DirectPoll:
    """How to GET a batch without the SDK: URL prefix, headers (auth included) and timeout."""

    prefix: str
    headers: Mapping[str, str]
    timeout: aiohttp.ClientTimeout


class LoopPool:
    """The HTTP clients and in-flight limit shared by the async hooks of one event loop."""

    def __init__(self) -> None:
        # the SDK's aiohttp client: about half the CPU per request of the httpx2 one under concurrency
        from openai import DefaultAioHttpClient

        limits = httpx2.Limits(
            max_connections=ASYNC_POOL_MAX_CONNECTIONS, max_keepalive_connections=ASYNC_POOL_MAX_CONNECTIONS
        )
        self.http_client: httpx2.AsyncClient = DefaultAioHttpClient(verify=shared_ssl_context(), limits=limits)
        # direct polls: our own session (the SDK's is not public)
        connector = aiohttp.TCPConnector(
            limit=ASYNC_POOL_MAX_CONNECTIONS, ssl=shared_ssl_context(), keepalive_timeout=limits.keepalive_expiry
        )
        self.session = aiohttp.ClientSession(connector=connector)
        self.slots = asyncio.Semaphore(ASYNC_POOL_MAX_CONNECTIONS)
        self.clients: dict[str, SharedClient] = {}
        #: hooks holding a shared client of this pool (stale ones past the TTL included)
        self.users = 0

    @property
    def closed(self) -> bool:
        return self.http_client.is_closed or self.session.closed

    async def aclose(self) -> None:
        await self.http_client.aclose()
        await self.session.close()


class SharedClient:
    """One connection's SDK client on one loop, shared by the async hooks of that ``conn_id`` while any is open.

    A thousand triggers starting together then make one connection lookup and build one client, instead of
    a thousand of each in the same loop iteration.
    """

    def __init__(self) -> None:
        self.ready: asyncio.Future[tuple[Any, bool]] = asyncio.get_running_loop().create_future()
        self.created = time.monotonic()
        self.users = 0
        #: an async Entra ID credential to close with the client
        self.credential: Any = None
        #: how to poll without the SDK, or ``None`` where only the SDK knows the auth
        self.direct: DirectPoll | None = None


@dataclass
class Lease:
    """What one hook holds of its loop's pool: the shared client of its connection."""

    pool: LoopPool
    entry: SharedClient
    client: Any
    is_azure: bool


def direct_poll(client: Any, kwargs: Mapping[str, Any]) -> DirectPoll | None:
    """How to poll a batch without the SDK's request machinery, for a plain ``AsyncOpenAI`` with a static key.

    Decided from the settings the client was built with: Azure clients, API-key callables, workload identity,
    providers, custom auth or default query parameters return ``None`` (their requests need the SDK).

    :param client: the SDK client.
    :param kwargs: the keyword arguments it was built with.
    """
    from openai import AsyncOpenAI

    if type(client) is not AsyncOpenAI or not isinstance(kwargs.get("api_key"), str):
        return None
    if not set(kwargs) <= _DIRECT_SAFE_KWARGS or client.default_query or client.custom_auth is not None:
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
    return DirectPoll(str(client.base_url).rstrip("/") + "/batches/", headers, client_timeout)


_loop_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPool] = weakref.WeakKeyDictionary()


def loop_pool() -> LoopPool:
    """The running loop's shared pool: one set of kept-alive connections whatever the number of triggers.

    It holds no credentials: each hook's SDK client adds its own auth headers per request.
    """
    loop = asyncio.get_running_loop()
    pool = _loop_pools.get(loop)
    if pool is None or pool.closed:
        pool = _loop_pools[loop] = LoopPool()
    return pool


async def close_loop_pool() -> None:
    """Close the running loop's shared HTTP pool (before the loop ends: scripts, tests). Hooks reopen one."""
    pool = _loop_pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.aclose()


#: Builds a connection's client over the pool's HTTP client: ``(client, kwargs it was built with, async
#: credential to close or None, is_azure)``.
Build = Callable[[httpx2.AsyncClient], Awaitable[tuple[Any, Mapping[str, Any], Any, bool]]]


async def lease(conn_id: str, build: Build) -> Lease:
    """The loop's shared client of ``conn_id``: built by the first caller (one connection lookup), awaited by
    the callers that arrive meanwhile, rebuilt after :data:`SHARED_CLIENT_TTL_S`.

    :param conn_id: the connection.
    :param build: how to build its client (called at most once per TTL per loop, unless it fails).
    """
    pool = loop_pool()
    while True:
        entry = pool.clients.get(conn_id)
        if entry is None or time.monotonic() - entry.created > SHARED_CLIENT_TTL_S:
            entry = pool.clients[conn_id] = SharedClient()
            entry.users += 1
            try:
                client, kwargs, credential, is_azure = await build(pool.http_client)
            except BaseException as error:
                entry.users -= 1
                if pool.clients.get(conn_id) is entry:
                    del pool.clients[conn_id]
                if isinstance(error, asyncio.CancelledError):
                    entry.ready.cancel()
                else:
                    entry.ready.set_exception(error)
                    entry.ready.exception()  # retrieved: waiters re-raise it, nobody else must log it
                raise
            entry.credential = credential
            entry.direct = direct_poll(client, kwargs)
            entry.ready.set_result((client, is_azure))
        else:
            entry.users += 1
        try:
            client, is_azure = await asyncio.shield(entry.ready)
        except asyncio.CancelledError:
            entry.users -= 1
            if entry.ready.cancelled():  # its creator was cancelled, not us: build it ourselves
                continue
            raise
        except BaseException:
            entry.users -= 1
            raise
        pool.users += 1
        return Lease(pool, entry, client, is_azure)


async def release(held: Lease, conn_id: str) -> None:
    """Give a lease back: the client's credential is closed when its last user leaves, the loop's HTTP pool
    when the last hook of the loop does. A triggerer keeps its pool while any trigger waits; ``dag.test()`` and
    tests, which run each trigger in a fresh loop, leave no open connection behind."""
    pool, entry = held.pool, held.entry
    entry.users -= 1
    credential = None
    if entry.users == 0:
        credential = entry.credential
        if pool.clients.get(conn_id) is entry:
            del pool.clients[conn_id]
    pool.users -= 1
    if pool.users <= 0:
        loop = asyncio.get_running_loop()
        if _loop_pools.get(loop) is pool:
            del _loop_pools[loop]  # first, so a hook attaching meanwhile builds a new pool
        await pool.aclose()
    if credential is not None:
        await credential.close()


async def direct_batch_state(held: Lease, batch_id: str) -> dict[str, Any] | None:
    """The batch's JSON from one GET on the pool's aiohttp session; ``None`` for anything unexpected (the
    caller asks the SDK then, for its retries, error types and messages).

    :param held: a lease whose client allows direct polls (``held.entry.direct``).
    :param batch_id: the batch id.
    """
    direct = held.entry.direct
    if direct is None:
        return None
    data: Any = None
    try:
        async with held.pool.slots:
            url = direct.prefix + urllib.parse.quote(batch_id, safe="")
            async with held.pool.session.get(url, headers=dict(direct.headers), timeout=direct.timeout) as response:
                if response.status == 200:
                    data = orjson.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
        return None
    if isinstance(data, dict) and isinstance(data.get("status"), str):
        return data
    return None
