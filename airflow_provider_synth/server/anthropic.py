"""Anthropic's Message Batches API on the local server: ``/v1/messages/batches`` and its results.

A message batch runs as the server's own batches do, on the same schedule, outcome rules, faults, state and
gateway: its requests are turned into chat-completion lines (:func:`params_to_chat`) and run by the
:class:`~airflow_provider_synth.server.runner.BatchRunner`; its results are the answers turned back into
Anthropic's messages and result types (:func:`result_of`). An outcome rule's HTTP status becomes the error type
Anthropic uses for it (``529``: ``overloaded_error``, ``429``: ``rate_limit_error``, ``500``: ``api_error``,
``400``: ``invalid_request_error``); ``expired`` and ``batch_cancelled`` become the ``expired`` and
``canceled`` results. In gateway mode the upstream (an OpenAI-compatible server, e.g. vLLM) writes the answers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from airflow_provider_synth.runs.anthropic_messages import ERROR_STATUS, MAX_BATCH_REQUESTS
from airflow_provider_synth.server import answers
from airflow_provider_synth.server.state import BatchRecord, FileRecord, new_id

if TYPE_CHECKING:
    from airflow_provider_synth.server.app import SynthBatchApp

#: The purpose of the internal input file of a message batch (not listed by ``/v1/files``).
INTERNAL_PURPOSE = "message_batch"
ANTHROPIC_KIND = "anthropic"
PREFIX = "/v1/messages/batches"
_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: HTTP status -> Anthropic's error type (the inverse of the client's table)
ERROR_TYPES: dict[int, str] = {status: etype for etype, status in ERROR_STATUS.items()}
_OPENAI_STATUS_TO_PHASE = {"validating": "in_progress", "in_progress": "in_progress", "finalizing": "in_progress",
                           "cancelling": "canceling", "completed": "ended", "expired": "ended",
                           "cancelled": "ended", "failed": "ended"}


def is_anthropic_path(path: str) -> bool:
    """Whether a request is for Anthropic's API (errors are answered in its shape)."""
    return path.startswith("/v1/messages")


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, etype: str | None = None) -> dict[str, Any]:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": etype or error_type(status), "message": message},
            "request_id": new_id("req_", 24)}


class AnthropicAPIError(Exception):
    """An error answered in Anthropic's shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- Anthropic params -> a chat-completions body ---------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or () if isinstance(b, dict) and b.get("type") == "text")


def _user_parts(blocks: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chat content parts, tool messages) of a user turn's blocks."""
    parts: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            src = block.get("source") or {}
            url = src.get("url") if src.get("type") == "url" else f"data:{src.get('media_type')};base64,{src.get('data')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_result":
            tools.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": _text(block.get("content"))})
    return parts, tools


def _chat_messages(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = params.get("system")
    if system:
        out.append({"role": "system", "content": _text(system)})
    for msg in params.get("messages") or ():
        content = msg.get("content")
        if msg.get("role") == "assistant":
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            calls = [{"id": b.get("id"), "type": "function",
                      "function": {"name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()}}
                     for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
            out.append({"role": "assistant", "content": _text(blocks) or None, **({"tool_calls": calls} if calls else {})})
        elif isinstance(content, str):
            out.append({"role": "user", "content": content})
        else:
            parts, tools = _user_parts(content or [])
            out.extend(tools)
            if parts:
                out.append({"role": "user", "content": parts})
    return out


def _chat_tool_choice(choice: Mapping[str, Any]) -> Any:
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"any": "required", "none": "none"}.get(str(kind), "auto")


def params_to_chat(params: Mapping[str, Any]) -> dict[str, Any]:
    """A chat-completions body asking what an Anthropic Messages request asks (for the local answers and the
    gateway's upstream)."""
    body: dict[str, Any] = {"model": params.get("model"), "messages": _chat_messages(params),
                            "max_tokens": params.get("max_tokens")}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("stop_sequences", "stop")):
        if params.get(src) is not None:
            body[dst] = params[src]
    if params.get("tools"):
        body["tools"] = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                                           "parameters": t.get("input_schema") or {}}}
                         for t in params["tools"] if isinstance(t, dict)]
    if isinstance(params.get("tool_choice"), dict):
        body["tool_choice"] = _chat_tool_choice(params["tool_choice"])
    fmt = (params.get("output_config") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt.get("schema") or {}}}
    return body


# -- a chat completion -> an Anthropic message -----------------------------------------------------------------

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def chat_to_message(body: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """An Anthropic ``message`` for a chat completion's first choice (usage split as Anthropic reports it:
    input without the cache reads, which are ``cache_read_input_tokens``)."""
    choice = (body.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    stop = _STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn")
    text = msg.get("refusal") or msg.get("content")
    if msg.get("refusal"):
        stop = "refusal"
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = {}
        content.append({"type": "tool_use", "id": "toolu_" + str(call.get("id", ""))[-24:], "name": fn.get("name"),
                        "input": args})
    usage = body.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {"id": "msg_" + str(body.get("id", new_id("", 24)))[-24:], "type": "message", "role": "assistant",
            "model": model or body.get("model"), "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": prompt - cached, "output_tokens": int(usage.get("completion_tokens") or 0),
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}}


def result_of(line: Mapping[str, Any]) -> dict[str, Any]:
    """A Message Batches ``result`` for one output or error line of the internal batch."""
    resp = line.get("response")
    error = line.get("error")
    if resp is None:
        code = (error or {}).get("code")
        if code == "batch_expired":
            return {"type": "expired"}
        if code == "batch_cancelled":
            return {"type": "canceled"}
        return {"type": "errored", "error": error_body(504 if code == "request_timeout" else 500,
                                                       str((error or {}).get("message") or code))}
    status = int(resp.get("status_code") or 500)
    body = resp.get("body") or {}
    if status == 200 and not body.get("error"):
        return {"type": "succeeded", "message": chat_to_message(body)}
    err = body.get("error") or {}
    code = err.get("code")
    etype = code if isinstance(code, str) and code in ERROR_STATUS else error_type(status)
    return {"type": "errored", "error": error_body(status, str(err.get("message") or f"status {status}"), etype)}


# -- the routes ------------------------------------------------------------------------------------------------


def _rfc3339(epoch: int | float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class MessageBatches:
    """The ``/v1/messages/batches`` routes of a :class:`~airflow_provider_synth.server.app.SynthBatchApp`.

    :param app: the server application (its store, runner, rules and counters).
    """

    def __init__(self, app: SynthBatchApp) -> None:
        self.app = app

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(PREFIX, self.create)
        router.add_get(PREFIX, self.list)
        router.add_get(PREFIX + "/{batch_id}", self.retrieve)
        router.add_post(PREFIX + "/{batch_id}/cancel", self.cancel)
        router.add_get(PREFIX + "/{batch_id}/results", self.results)
        router.add_delete(PREFIX + "/{batch_id}", self.delete)

    # -- views ----------------------------------------------------------------------------------------------

    def view(self, batch: BatchRecord, request: web.Request) -> dict[str, Any]:
        """The ``message_batch`` object of a batch."""
        api = batch.api
        phase = _OPENAI_STATUS_TO_PHASE.get(batch.status, "in_progress")
        ended_at = next((api.get(k) for k in ("completed_at", "expired_at", "cancelled_at", "failed_at")
                         if api.get(k)), None)
        origin = f"{request.scheme}://{request.host}"
        return {"id": batch.id, "type": "message_batch", "processing_status": phase,
                "request_counts": self.counts(batch), "ended_at": _rfc3339(ended_at) if phase == "ended" else None,
                "created_at": _rfc3339(api["created_at"]), "expires_at": _rfc3339(api["expires_at"]),
                "archived_at": None, "cancel_initiated_at": _rfc3339(api.get("cancelling_at")),
                "results_url": f"{origin}{PREFIX}/{batch.id}/results" if phase == "ended" else None}

    def counts(self, batch: BatchRecord) -> dict[str, int]:
        """``request_counts``: while running, from the progress; once ended, from the results (kept)."""
        if batch.status in ("completed", "expired", "cancelled", "failed"):
            if batch.result_counts is None:
                counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
                for _, result in self._results(batch):
                    counts[result["type"]] += 1
                batch.result_counts = counts
                self.app.store.save_batch(batch)
            return dict(batch.result_counts)
        rc = batch.api["request_counts"]
        total = int(rc["total"]) or int(batch.message_requests)
        return {"processing": max(total - int(rc["completed"]) - int(rc["failed"]), 0),
                "succeeded": int(rc["completed"]), "errored": int(rc["failed"]), "canceled": 0, "expired": 0}

    def _results(self, batch: BatchRecord) -> Iterator[tuple[str, dict[str, Any]]]:
        store = self.app.store
        if batch.status == "failed":  # refused as a whole (an injected failure): every request errored
            reason = "; ".join(e.get("message", "") for e in (batch.api.get("errors") or {}).get("data") or [])
            with store.input_path(batch).open("rb") as fp:
                for raw in fp:
                    if raw.strip():
                        yield orjson.loads(raw)["custom_id"], {"type": "errored", "error": error_body(500, reason)}
            return
        for key in ("output_file_id", "error_file_id"):
            file_id = batch.api.get(key)
            if not file_id or file_id not in store.files:
                continue
            with store.file_path(file_id).open("rb") as fp:
                for raw in fp:
                    if raw.strip():
                        line = orjson.loads(raw)
                        yield line["custom_id"], result_of(line)

    def _batch(self, request: web.Request) -> BatchRecord:
        batch = self.app.store.batches.get(request.match_info["batch_id"])
        if batch is None or batch.api_kind != ANTHROPIC_KIND:
            raise AnthropicAPIError(404, f"No message batch found with id '{request.match_info['batch_id']}'.")
        return batch

    # -- handlers -------------------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        try:
            data = await request.json(loads=orjson.loads)
        except ValueError:
            raise AnthropicAPIError(400, "The request body is not valid JSON.") from None
        requests = data.get("requests") if isinstance(data, dict) else None
        lines = self._lines(requests)
        app = self.app
        path = app.store.files_dir / f".mb-{new_id('', 16)}"
        path.write_bytes(b"".join(lines))
        record = FileRecord(new_id("file-"), "message_batch.jsonl", INTERNAL_PURPOSE, path.stat().st_size,
                            int(time.time()))
        path.replace(app.store.file_path(record.id))
        app.store.add_file(record)
        batch = BatchRecord.new(record.id, "/v1/chat/completions", None, None)
        batch.api["id"] = new_id("msgbatch_", 24)
        batch.api_kind, batch.message_requests = ANTHROPIC_KIND, len(lines)
        # checked here already (the internal batch's own check would refuse mixed models, which Anthropic takes)
        batch.api["request_counts"]["total"] = len(lines)
        batch.api["model"] = orjson.loads(lines[0])["body"]["model"]
        batch.tokens = sum(answers.input_tokens(orjson.loads(line)["body"]) for line in lines)
        batch.fail, batch.expire_after = app.take_batch_flags()
        app.store.add_batch(batch)
        app.counters.inc("message_batches_created")
        app.runner.start(batch)
        return _json(self.view(batch, request))

    def _lines(self, requests: Any) -> list[bytes]:
        """The internal chat lines of a create call's ``requests``, checked as the API checks them."""
        if not isinstance(requests, list) or not requests:
            raise AnthropicAPIError(400, "requests: a non-empty list of {custom_id, params} is required.")
        most = min(self.app.config.max_requests, MAX_BATCH_REQUESTS)
        if len(requests) > most:
            raise AnthropicAPIError(400, f"requests: at most {most} requests per batch; got {len(requests)}.")
        seen: set[str] = set()
        lines = []
        for i, req in enumerate(requests):
            cid = req.get("custom_id") if isinstance(req, dict) else None
            params = req.get("params") if isinstance(req, dict) else None
            if not isinstance(cid, str) or not _CUSTOM_ID.fullmatch(cid):
                raise AnthropicAPIError(400, f"requests.{i}.custom_id: must be 1-64 characters of [A-Za-z0-9_-].")
            if cid in seen:
                raise AnthropicAPIError(400, f"requests.{i}.custom_id: '{cid}' is used more than once.")
            seen.add(cid)
            if not isinstance(params, dict) or not isinstance(params.get("model"), str) or not isinstance(
                    params.get("messages"), list) or not isinstance(params.get("max_tokens"), int):
                raise AnthropicAPIError(400, f"requests.{i}.params: model, max_tokens and messages are required.")
            lines.append(orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                       "body": params_to_chat(params)}) + b"\n")
        return lines

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        self.app.counters.inc("message_batch_polls")
        self.app.runner.polled(batch)
        if self.app.config.poll_delay_s > 0:
            import asyncio

            await asyncio.sleep(self.app.config.poll_delay_s)
        return _json(self.view(batch, request))

    async def list(self, request: web.Request) -> web.Response:
        batches = [b for b in reversed(self.app.store.batches.values()) if b.api_kind == ANTHROPIC_KIND]
        ids = [b.id for b in batches]
        after, before = request.query.get("after_id"), request.query.get("before_id")
        if after in ids:
            batches = batches[ids.index(after) + 1:]
        elif before in ids:
            batches = batches[:ids.index(before)]
        try:
            limit = int(request.query.get("limit", 20))
        except ValueError:
            raise AnthropicAPIError(400, "limit must be an integer.") from None
        if not 1 <= limit <= 1000:
            raise AnthropicAPIError(400, "limit must be between 1 and 1000.")
        page = [self.view(b, request) for b in batches[:limit]]
        return _json({"data": page, "has_more": len(batches) > limit,
                      "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None})

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if batch.status in ("validating", "in_progress", "finalizing"):
            self.app.runner.cancel(batch)
            self.app.counters.inc("message_batches_cancel_requests")
        elif batch.status != "cancelling":
            raise AnthropicAPIError(400, f"Batch {batch.id} has ended and can no longer be canceled.")
        return _json(self.view(batch, request))

    async def results(self, request: web.Request) -> web.StreamResponse:
        batch = self._batch(request)
        if _OPENAI_STATUS_TO_PHASE.get(batch.status) != "ended":
            raise AnthropicAPIError(400, f"Batch {batch.id} has not ended yet; its results are not available.")
        self.app.counters.inc("message_batch_results")
        response = web.StreamResponse(headers={"Content-Type": "application/binary"})
        await response.prepare(request)
        chunk: list[bytes] = []
        for cid, result in self._results(batch):
            chunk.append(orjson.dumps({"custom_id": cid, "result": result}) + b"\n")
            if len(chunk) >= 500:
                await response.write(b"".join(chunk))
                chunk = []
        if chunk:
            await response.write(b"".join(chunk))
        await response.write_eof()
        return response

    async def delete(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if _OPENAI_STATUS_TO_PHASE.get(batch.status) != "ended":
            raise AnthropicAPIError(400, f"Batch {batch.id} is still processing; cancel it first.")
        self.app.store.delete_batch(batch.id)
        return _json({"id": batch.id, "type": "message_batch_deleted"})
