"""Gateway mode of the local Batch API server: run each batch request against an OpenAI-compatible server.

With ``--upstream http://host:port/v1`` the server gives any OpenAI-compatible endpoint (``vllm serve``, a
llama.cpp server, Ollama) the OpenAI Batch API: a DAG written for OpenAI runs unchanged against it.
A slow upstream is never a failure: requests wait on the gateway's side, and only as many go upstream at once
as it sustains (:class:`~airflow_provider_synth.server.concurrency.AdaptiveLimit`: AIMD on the time per token,
vLLM's ``/metrics`` queue, 429/503), at most ``upstream_concurrency``; a request only times out when it is hung
(no answer for ``max(upstream_timeout_s, 10 x the slowest answer so far)``). 429, 5xx, hung requests and
connection errors are retried (tenacity, honouring ``retry-after``); what still fails lands in the batch's error
file as OpenAI would write it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from airflow_provider_synth.server import answers
from airflow_provider_synth.server.concurrency import AdaptiveLimit
from airflow_provider_synth.server.config import Rules, ServerConfig
from airflow_provider_synth.server.runner import (
    LOCAL_ENDPOINTS,
    Item,
    Result,
    normalize_endpoint,
    null_line,
    outcome_result,
    output_line,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
#: answers that mean "too much at once": the limit comes down
OVERLOAD_STATUSES = frozenset({429, 503})
MAX_BACKOFF_S = 10.0
#: seconds between reads of the upstream's queue (vLLM's /metrics) while requests are in flight
METRICS_INTERVAL_S = 1.0
WAITING_METRIC = "vllm:num_requests_waiting"


class UpstreamRetryableError(Exception):
    """A retryable answer from the upstream (429, 5xx...), kept to be reported if retries run out."""

    def __init__(self, status: int, body: Any, retry_after: float | None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.retry_after = retry_after


def _wait(state: RetryCallState) -> float:
    """Exponential backoff from 0.1 s, or the upstream's ``retry-after`` when it sent one."""
    exc = state.outcome.exception() if state.outcome is not None else None
    if isinstance(exc, UpstreamRetryableError) and exc.retry_after is not None:
        return min(exc.retry_after, MAX_BACKOFF_S)
    return float(min(0.1 * 2 ** (state.attempt_number - 1), MAX_BACKOFF_S))


def _error_body(status: int, message: str, code: str) -> dict[str, Any]:
    err_type = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def _as_error_body(status: int, body: Any) -> dict[str, Any]:
    """The upstream's error body if it is OpenAI-shaped, else one that wraps it."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body
    text = body if isinstance(body, str) else orjson.dumps(body).decode()
    return _error_body(status, f"upstream answered {status}: {text[:500]}", "upstream_error")


def _parse_retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def parse_waiting(text: str) -> int | None:
    """The requests an upstream holds in its own queue, from a Prometheus page (vLLM's ``/metrics``), or None
    when the page has no such figure."""
    found = None
    for line in text.splitlines():
        if line.startswith(WAITING_METRIC) and not line.startswith(WAITING_METRIC + "_"):
            try:
                found = (found or 0) + int(float(line.rsplit(" ", 1)[1]))
            except (IndexError, ValueError):
                continue
    return found


class UpstreamProcessor:
    """Runs batch requests against ``config.upstream_url``; outcome rules still apply first.

    Requests wait for a slot of :attr:`limit` on this side; :meth:`submit` runs one (the batch runner keeps
    :attr:`window` of them on their way and commits their answers in input order as they land).

    :param rules: the outcome rules (a request given a non-success outcome never reaches the upstream).
    :param config: returns the current settings.
    """

    def __init__(self, rules: Rules, config: Callable[[], ServerConfig]) -> None:
        self.rules = rules
        self.config = config
        cfg = config()
        self.limit = AdaptiveLimit(cfg.upstream_concurrency, cfg.upstream_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._metrics: asyncio.Task[None] | None = None

    @property
    def window(self) -> int:
        """Requests of one batch on their way at once (in flight or waiting for a slot): enough that one slow
        answer never idles the upstream while the answers after it wait to be committed in order."""
        return self.config().upstream_concurrency * 4

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            cfg = self.config()
            headers = {"Content-Type": "application/json"}
            if cfg.upstream_api_key:
                headers["Authorization"] = f"Bearer {cfg.upstream_api_key}"
            self._session = aiohttp.ClientSession(
                headers=headers, connector=aiohttp.TCPConnector(limit=cfg.upstream_concurrency + 1)
            )
            if cfg.upstream_url:
                self._metrics = asyncio.get_running_loop().create_task(
                    self._watch_queue(cfg.upstream_url), name="synth-upstream-metrics")
        return self._session

    async def run(self, items: list[Item]) -> list[Result]:
        return list(await asyncio.gather(*(self.submit(item) for item in items)))

    async def close(self) -> None:
        if self._metrics is not None:
            self._metrics.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics
            self._metrics = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _watch_queue(self, base_url: str) -> None:
        """Read the upstream's queue while requests are in flight; stop for good where it publishes none."""
        url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
        session = self._client()
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            if self.limit.in_flight == 0:
                continue
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    waiting = parse_waiting(await resp.text()) if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
                continue
            if waiting is None:
                log.info("the upstream publishes no %s at %s: concurrency follows its latency only",
                         WAITING_METRIC, url)
                return
            self.limit.observe_queue(waiting)

    async def submit(self, item: Item) -> Result:
        """Run one request (it waits on this side for a slot first)."""
        outcome = self.rules.outcome_for(item.custom_id)
        if outcome.kind != "success" or outcome.content is not None or normalize_endpoint(item.url) in LOCAL_ENDPOINTS:
            return outcome_result(item, outcome)
        cfg = self.config()
        session = self._client()
        body = dict(item.body)
        if cfg.upstream_model:
            body["model"] = cfg.upstream_model
        url = cfg.upstream_url.rstrip("/") + item.url.removeprefix("/v1") if cfg.upstream_url else item.url
        try:
            status, answer = await self._call(session, url, body, cfg)
        except UpstreamRetryableError as exc:
            return Result(False, output_line(item.custom_id, exc.status, _as_error_body(exc.status, exc.body)))
        except TimeoutError:
            return Result(False, null_line(item.custom_id, "request_timeout"))
        except aiohttp.ClientError as exc:
            log.warning("upstream unreachable for %s: %s", item.custom_id, exc)
            body502 = _error_body(502, f"upstream unreachable: {type(exc).__name__}", "upstream_unreachable")
            return Result(False, output_line(item.custom_id, 502, body502))
        if status == 200 and isinstance(answer, dict):
            if cfg.upstream_model:
                answer["model"] = item.body.get("model", answer.get("model"))
            return Result(True, output_line(item.custom_id, 200, answer), answers.usage_of(answer))
        return Result(False, output_line(item.custom_id, status, _as_error_body(status, answer)))

    async def _call(
        self, session: aiohttp.ClientSession, url: str, body: dict[str, Any], cfg: ServerConfig
    ) -> tuple[int, Any]:
        """POST one request; retry what can succeed on retry; return the final status and body."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, cfg.upstream_retries)),
            wait=_wait,
            retry=retry_if_exception_type((UpstreamRetryableError, TimeoutError, aiohttp.ClientConnectionError)),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(session, url, body)
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _attempt(self, session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        """One POST, inside a slot of the limit; what it learnt goes back to the limit."""
        await self.limit.acquire()
        started, latency, tokens, congested = time.monotonic(), None, 0, False
        try:
            timeout = aiohttp.ClientTimeout(total=self.limit.hung_after())
            async with session.post(url, data=orjson.dumps(body), timeout=timeout) as resp:
                raw = await resp.read()
                try:
                    parsed: Any = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    parsed = raw.decode(errors="replace")
                congested = resp.status in OVERLOAD_STATUSES
                if resp.status in RETRY_STATUSES:
                    raise UpstreamRetryableError(resp.status, parsed, _parse_retry_after(resp.headers.get("retry-after")))
                if resp.status == 200:
                    latency = time.monotonic() - started
                    usage = parsed.get("usage") if isinstance(parsed, dict) else None
                    tokens = int(usage.get("completion_tokens") or 0) if isinstance(usage, dict) else 0
                return resp.status, parsed
        except TimeoutError:
            congested = True
            log.warning("an upstream request had no answer for %.0f s: hung, given up", time.monotonic() - started)
            raise
        finally:
            self.limit.release(latency, tokens, congested=congested)
