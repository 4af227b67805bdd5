"""The aiohttp application of the local Batch API server: routes, auth, faults, control API.

:class:`~airflow_provider_synth.server.server.BatchServer` runs it in a background thread; the command line
(``python -m airflow_provider_synth.server``) runs it in the main thread.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from airflow_provider_synth.server import answers
from airflow_provider_synth.server import anthropic as messages_api
from airflow_provider_synth.server.config import Fault, Outcome, OutcomeRule, Rules, ServerConfig, is_loopback
from airflow_provider_synth.server.runner import (
    BATCH_ENDPOINTS,
    BatchRunner,
    Counters,
    LocalProcessor,
    Processor,
    check_input,
    normalize_endpoint,
)
from airflow_provider_synth.server.state import BatchRecord, FileRecord, Store, new_id

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini", "text-embedding-3-small", "text-embedding-3-large")
FILE_PURPOSES = frozenset({"batch", "fine-tune", "assistants", "vision", "user_data", "evals"})
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512
#: A synchronous request carrying this header (as OpenAI's API accepts) gets the outcome rules of that custom_id.
CLIENT_REQUEST_ID_HEADER = "X-Client-Request-Id"
#: Settings fixed when the server starts. The upstream ones above all: were they changeable, anyone reaching the
#: control API could point the gateway at their own host and collect the upstream key it sends.
STARTUP_ONLY = frozenset({
    "host", "port", "state_dir", "api_key", "max_file_bytes",
    "upstream_url", "upstream_api_key", "upstream_model", "upstream_concurrency", "upstream_timeout_s",
    "upstream_retries",
})


def _tiered(answer: dict[str, Any], tier: str, endpoint: str) -> dict[str, Any]:
    """Chat and Responses answers name the service tier that served them, as OpenAI's do."""
    if endpoint.removeprefix("/v1") in ("/chat/completions", "/responses"):
        answer["service_tier"] = tier
    return answer


class APIError(Exception):
    """An error answered with OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``
    (:meth:`azure_body` on Azure's dated routes)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, err_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {
            "error": {
                "message": message,
                "type": err_type or ("invalid_request_error" if status < 500 else "server_error"),
                "param": param,
                "code": code,
            }
        }

    def azure_body(self) -> dict[str, Any]:
        """Azure OpenAI's error shape: ``{"error": {"code", "message"}}`` (``target`` names the parameter);
        Azure's codes are its own, or the HTTP status as a string (``"401"``, ``"404"``)."""
        error = self.body["error"]
        body: dict[str, Any] = {"code": _AZURE_CODES.get(self.status) or error["code"] or str(self.status),
                                "message": error["message"]}
        if error["param"]:
            body["target"] = error["param"]
        return {"error": body}


#: Azure answers these statuses with the status itself as the code (whatever the cause).
_AZURE_CODES = {401: "401", 403: "403", 404: "404", 429: "429"}


def _is_azure_dated(path: str) -> bool:
    """Azure's dated routes (``/openai/...?api-version=``); its v1 routes (``/openai/v1/...``) speak OpenAI's."""
    return path.startswith("/openai/") and not path.startswith("/openai/v1/")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _api_path(path: str) -> str:
    """Azure's ``/openai/...`` and ``/openai/v1/...`` routes are matched against faults as their ``/v1/...`` twins."""
    if path.startswith("/openai/v1/"):
        return path[len("/openai") :]
    return "/v1" + path[len("/openai") :] if path.startswith("/openai/") else path


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """A cursor page (``after`` = the id of the last item of the previous page)."""
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def _limit(request: web.Request, default: int, most: int) -> int:
    try:
        limit = int(request.query.get("limit", default))
    except ValueError:
        raise APIError(400, "limit must be an integer.", "invalid_value", "limit") from None
    if not 1 <= limit <= most:
        raise APIError(400, f"limit must be between 1 and {most}.", "invalid_value", "limit")
    return limit


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """Enforce the Batch API's metadata limits: 16 pairs, keys up to 64 chars, string values up to 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise APIError(400, "metadata must be an object of string keys and values.", "invalid_type", "metadata")
    if len(metadata) > METADATA_MAX_PAIRS:
        raise APIError(
            400, f"metadata holds at most {METADATA_MAX_PAIRS} pairs; got {len(metadata)}.", "invalid_value", "metadata"
        )
    for key, value in metadata.items():
        if len(key) > METADATA_MAX_KEY:
            raise APIError(
                400, f"metadata key {key[:20]!r}... is over {METADATA_MAX_KEY} characters.", "invalid_value", "metadata"
            )
        if not isinstance(value, str) or len(value) > METADATA_MAX_VALUE:
            raise APIError(
                400, f"metadata value of {key!r} must be a string of at most {METADATA_MAX_VALUE} characters.",
                "invalid_value", "metadata",
            )
    return dict(metadata)


#: Expiry bounds of files (OpenAI: one hour to 30 days after ``created_at``).
EXPIRES_MIN_S, EXPIRES_MAX_S = 3600, 30 * 86400


def check_expires_after(value: Any, param: str) -> int | None:
    """The seconds of an ``expires_after``/``output_expires_after`` object (``{"anchor": "created_at",
    "seconds": N}``), checked as OpenAI does."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise APIError(400, f"{param}.anchor must be 'created_at'.", "invalid_value", f"{param}.anchor")
    try:
        seconds = int(value.get("seconds"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise APIError(400, f"{param}.seconds must be an integer.", "invalid_type", f"{param}.seconds") from None
    if not EXPIRES_MIN_S <= seconds <= EXPIRES_MAX_S:
        raise APIError(400, f"{param}.seconds must be between {EXPIRES_MIN_S} (1 hour) and {EXPIRES_MAX_S} "
                       "(30 days).", "invalid_value", f"{param}.seconds")
    return seconds


class SynthBatchApp:
    """The aiohttp application and its state; :class:`BatchServer` runs it in a thread, the CLI in ``main``.

    :param config: the settings.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.rules = Rules(config)
        self.counters = Counters()
        self._lock = threading.Lock()
        self._fail_left = config.fail_batches
        self._expire_left = config.expire_times
        self._tmp: str | None = None
        if config.state_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="synth-batch-server-")
        self.store = Store(Path(config.state_dir or self._tmp or "."))
        self.runner = BatchRunner(self.store, lambda: self.config, self._make_processor(), self.counters)
        self.web_runner: web.AppRunner | None = None
        self.port = 0

    def _make_processor(self) -> Processor:
        if self.config.upstream_url:
            from airflow_provider_synth.server.upstream import UpstreamProcessor

            return UpstreamProcessor(self.rules, lambda: self.config)
        return LocalProcessor(self.rules)

    # --- settings -------------------------------------------------------------------------------------------

    def configure(self, **changes: Any) -> ServerConfig:
        """Change settings at run time; ``add_outcomes``/``add_faults`` append rules instead of replacing them."""
        fixed = STARTUP_ONLY & changes.keys()
        if fixed:
            raise ValueError(f"{sorted(fixed)} can only be set when the server starts")
        add_outcomes = [OutcomeRule.from_dict(r) for r in changes.pop("add_outcomes", [])]
        add_faults = [Fault.from_dict(f) for f in changes.pop("add_faults", [])]
        config = self.config.replace(**changes)
        with self._lock:
            self.config = config
            if "fail_batches" in changes:
                self._fail_left = config.fail_batches
            if "expire_times" in changes or "expire_after_requests" in changes:
                self._expire_left = config.expire_times
        if "outcomes" in changes:
            self.rules.set_outcomes(list(config.outcomes))
        if "faults" in changes:
            self.rules.set_faults(list(config.faults))
        for rule in add_outcomes:
            self.rules.add_outcome(rule)
        for fault in add_faults:
            self.rules.add_fault(fault)
        return config

    def config_view(self) -> dict[str, Any]:
        data = self.config.to_dict()
        data["outcomes"] = [_rule_dict(r) for r in self.rules.outcomes]
        data["faults"] = [_fault_dict(f) for f in self.rules.faults]
        return data

    def take_batch_flags(self) -> tuple[bool, int | None]:
        """Whether the next batch fails, and after how many requests it expires (consumes the budgets)."""
        with self._lock:
            fail = self._fail_left > 0
            if fail:
                self._fail_left -= 1
            expire = self.config.expire_after_requests
            if expire is not None and self._expire_left is not None:
                if self._expire_left > 0:
                    self._expire_left -= 1
                else:
                    expire = None
            return fail, expire

    # --- middleware -----------------------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        self.counters.route(f"{request.method} {resource.canonical if resource else request.path}")
        try:
            if _is_azure_dated(request.path) and not request.query.get("api-version"):
                raise APIError(400, "The api-version query parameter (?api-version=) is required for all requests "
                               "(or use the v1 routes, /openai/v1/..., which take none).",
                               "MissingApiVersionParameter", "api-version")
            self._authenticate(request)
            fault = self.rules.fault_for(request.method, _api_path(request.path))
            if fault is not None:
                self.counters.inc("faults_injected")
                early = await self._apply_fault(request, fault)
                if early is not None:
                    return early
            return await handler(request)
        except messages_api.AnthropicAPIError as exc:
            return _json(messages_api.error_body(exc.status, str(exc)), exc.status)
        except APIError as exc:
            return self._error(request, exc)
        except web.HTTPException as exc:
            return self._error(request, APIError(exc.status, exc.reason))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            log.exception("error answering %s %s", request.method, request.path)
            return _json(APIError(500, f"Local server error: {type(exc).__name__}: {exc}").body, 500)

    @staticmethod
    def _error(request: web.Request, exc: APIError, headers: dict[str, str] | None = None) -> web.Response:
        """An error in the shape of the API the request is for: OpenAI's, Azure's dated routes', Anthropic's."""
        if messages_api.is_anthropic_path(request.path):
            body = messages_api.error_body(exc.status, str(exc.body["error"]["message"]))
        else:
            body = exc.azure_body() if _is_azure_dated(request.path) else exc.body
        return _json(body, exc.status, headers)

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        # Bearer (OpenAI, the anthropic SDK 2.x), api-key (Azure), x-api-key (the anthropic SDK 1.x)
        key = header[7:].strip() if header.lower().startswith("bearer ") else (
            request.headers.get("api-key") or request.headers.get("x-api-key") or "").strip()
        if not key:
            raise APIError(401, "You didn't provide an API key (Authorization: Bearer or api-key header).",
                           "missing_api_key")
        if self.config.api_key is not None and not hmac.compare_digest(key.encode(), self.config.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "invalid_api_key")

    async def _apply_fault(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        if fault.kind == "delay":
            await asyncio.sleep(fault.delay_s)
            return None
        if fault.kind == "drop":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if fault.kind == "truncate" and request.match_info.get("file_id"):
            await self._truncated_download(request, fault)
        headers = {"retry-after": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        body = Outcome.error(fault.status, message=f"Injected fault: status {fault.status}.").error_body()
        if messages_api.is_anthropic_path(request.path):
            body = messages_api.error_body(fault.status, body["error"]["message"])
        return _json(body, fault.status, headers)

    async def _truncated_download(self, request: web.Request, fault: Fault) -> None:
        """Send the file's full length in the headers, then only its first ``after_bytes`` bytes, then hang up."""
        record = self._file(request)
        data = self.store.file_path(record.id).read_bytes()
        cut = len(data) // 2 if fault.after_bytes is None else min(fault.after_bytes, len(data))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[:cut])
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    # --- routes ---------------------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=self.config.max_file_bytes)
        for prefix in ("/v1", "/openai/v1", "/openai"):
            app.router.add_get(f"{prefix}/models", self.list_models)
            app.router.add_post(f"{prefix}/files", self.create_file)
            app.router.add_get(f"{prefix}/files", self.list_files)
            app.router.add_get(f"{prefix}/files/{{file_id}}", self.retrieve_file)
            app.router.add_get(f"{prefix}/files/{{file_id}}/content", self.file_content)
            app.router.add_delete(f"{prefix}/files/{{file_id}}", self.delete_file)
            app.router.add_post(f"{prefix}/batches", self.create_batch)
            app.router.add_get(f"{prefix}/batches", self.list_batches)
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", self.retrieve_batch)
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", self.cancel_batch)
            for endpoint in BATCH_ENDPOINTS:
                app.router.add_post(prefix + endpoint.removeprefix("/v1"), self.direct)
        app.router.add_post("/openai/deployments/{deployment}/{endpoint:.+}", self.direct)
        messages_api.MessageBatches(self).add_routes(app.router)
        if self.control_routes:
            app.router.add_get("/_synth/config", self.get_config)
            app.router.add_post("/_synth/config", self.post_config)
            app.router.add_get("/_synth/counters", self.get_counters)
            app.router.add_post("/_synth/reset", self.post_reset)
            app.router.add_post("/_synth/age", self.post_age)
        return app

    @property
    def control_routes(self) -> bool:
        """The control API (``/_synth/*``) is served on a loopback bind only, never to the network."""
        return is_loopback(self.config.host)

    async def list_models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "synth-local"} for m in MODELS]
        return _json({"object": "list", "data": data})

    async def create_file(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            raise APIError(400, "Files are uploaded as multipart/form-data.", "invalid_request")
        reader = await request.multipart()
        purpose, upload = None, None
        expiry: dict[str, str] = {}
        part_path = self.store.files_dir / f".upload-{new_id('', 16)}"
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name in ("expires_after[anchor]", "expires_after[seconds]"):
                    expiry[part.name[len("expires_after["):-1]] = (await part.text()).strip()
                elif part.name == "file":
                    upload = (part.filename or "upload.jsonl", await self._save_part(part, part_path))
            if upload is None:
                raise APIError(400, "Missing required parameter: 'file'.", "missing_required_parameter", "file")
            if purpose not in FILE_PURPOSES:
                raise APIError(400, f"Invalid purpose {purpose!r}; expected one of {sorted(FILE_PURPOSES)}.",
                               "invalid_value", "purpose")
            seconds = check_expires_after(expiry, "expires_after") if expiry else None
            record = FileRecord(new_id("file-"), upload[0], purpose, upload[1], int(time.time()))
            if seconds is not None:
                record.expires_at = record.created_at + seconds
            part_path.replace(self.store.file_path(record.id))
        finally:
            part_path.unlink(missing_ok=True)
        self.store.add_file(record)
        self.counters.inc("files_created")
        self.counters.inc("bytes_uploaded", record.bytes)
        return _json(record.to_api())

    async def _save_part(self, part: BodyPartReader, path: Path) -> int:
        """Stream an uploaded part to disk; never hold the whole file in memory."""
        size = 0
        with path.open("wb") as fp:
            while chunk := await part.read_chunk(1 << 16):
                size += len(chunk)
                if size > self.config.max_file_bytes:
                    raise APIError(400, f"File is over the limit of {self.config.max_file_bytes} bytes.",
                                   "file_too_large", "file")
                fp.write(chunk)
        return size

    def _file(self, request: web.Request) -> FileRecord:
        file_id = request.match_info["file_id"]
        self.store.purge_expired_files()
        record = self.store.files.get(file_id)
        if record is None:
            raise APIError(404, f"No such File object: {file_id}", "not_found", "id")
        return record

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        self.store.purge_expired_files()
        files = [f.to_api() for f in self.store.files.values() if purpose in (None, f.purpose)
                 and f.purpose != messages_api.INTERNAL_PURPOSE]
        if request.query.get("order", "desc") == "desc":
            files.reverse()
        return _json(_page(files, request.query.get("after"), _limit(request, 10_000, 10_000)))

    async def retrieve_file(self, request: web.Request) -> web.Response:
        return _json(self._file(request).to_api())

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        record = self._file(request)
        return web.FileResponse(self.store.file_path(record.id), headers={"Content-Type": "application/octet-stream"})

    async def delete_file(self, request: web.Request) -> web.Response:
        record = self._file(request)
        self.store.delete_file(record.id)
        self.counters.inc("files_deleted")
        return _json({"id": record.id, "object": "file", "deleted": True})

    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            data = await request.json(loads=orjson.loads)
        except ValueError:
            raise APIError(400, "The request body is not valid JSON.", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", "invalid_json")
        record = await self._new_batch(data)
        self.store.add_batch(record)
        self.counters.inc("batches_created")
        self.runner.start(record)
        return _json(record.api)

    async def _new_batch(self, data: dict[str, Any]) -> BatchRecord:
        """Check a batch creation request; reject it with a 400 before anything is created."""
        endpoint = data.get("endpoint")
        if not isinstance(endpoint, str) or normalize_endpoint(endpoint) not in BATCH_ENDPOINTS:
            raise APIError(400, f"Invalid endpoint {endpoint!r}; expected one of {list(BATCH_ENDPOINTS)}.",
                           "invalid_value", "endpoint")
        if data.get("completion_window") != "24h":
            raise APIError(400, "completion_window must be '24h'.", "invalid_value", "completion_window")
        metadata = check_metadata(data.get("metadata"))
        file_id = data.get("input_file_id")
        record = self.store.files.get(file_id) if isinstance(file_id, str) else None
        if record is None:
            raise APIError(400, f"Input file {file_id!r} not found.", "invalid_value", "input_file_id")
        if record.purpose != "batch":
            raise APIError(400, f"Input file {file_id} has purpose {record.purpose!r}, not 'batch'.",
                           "invalid_value", "input_file_id")
        batch = BatchRecord.new(record.id, endpoint, metadata, None)
        batch.output_expires_s = check_expires_after(data.get("output_expires_after"), "output_expires_after")
        if self.config.invalid_input == "reject":
            check = await asyncio.to_thread(
                check_input, self.store.file_path(record.id), normalize_endpoint(endpoint), self.config.max_requests
            )
            if check.problems:
                self.counters.inc("batches_rejected")
                first = check.problems[0]
                where = f"line {first['line']}: " if first["line"] else ""
                raise APIError(400, f"The input file is not a valid batch file ({len(check.problems)} problem(s)); "
                               f"{where}{first['message']}", first["code"], "input_file_id")
            batch.api["request_counts"]["total"] = check.total
            batch.api["model"] = check.model
            batch.tokens = check.tokens
        batch.fail, batch.expire_after = self.take_batch_flags()
        return batch

    def _batch(self, request: web.Request) -> BatchRecord:
        batch_id = request.match_info["batch_id"]
        batch = self.store.batches.get(batch_id)
        if batch is None or batch.api_kind != "openai":
            raise APIError(404, f"No batch found with id '{batch_id}'.", "not_found", "batch_id")
        return batch

    async def list_batches(self, request: web.Request) -> web.Response:
        batches = [b.api for b in reversed(self.store.batches.values()) if b.api_kind == "openai"]
        return _json(_page(batches, request.query.get("after"), _limit(request, 20, 100)))

    async def retrieve_batch(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        self.counters.inc("batch_polls")
        self.runner.polled(batch)
        if self.config.poll_delay_s > 0:
            await asyncio.sleep(self.config.poll_delay_s)
        return _json(batch.api)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if batch.status in ("validating", "in_progress"):
            self.runner.cancel(batch)
        elif batch.status not in ("cancelling", "cancelled"):
            raise APIError(400, f"Cannot cancel a batch with status '{batch.status}'.", "invalid_state", "batch_id")
        return _json(batch.api)

    async def direct(self, request: web.Request) -> web.Response:
        """The synchronous endpoints (``/v1/chat/completions``...), answered like batch requests."""
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            raise APIError(400, "The request body is not valid JSON.", "invalid_json") from None
        endpoint = "/" + request.match_info.get("endpoint", request.path.split("/", 2)[2])
        if isinstance(body, dict) and "deployment" in request.match_info:
            body.setdefault("model", request.match_info["deployment"])
        self.counters.inc("direct_requests")
        custom_id = request.headers.get(CLIENT_REQUEST_ID_HEADER)
        body = body if isinstance(body, dict) else {}
        tier = "flex" if body.get("service_tier") == "flex" else "default"
        if tier == "flex":
            self.counters.inc("direct_requests_flex")
            if any(fnmatch.fnmatchcase(custom_id or "", p) for p in self.config.flex_unavailable):
                self.counters.inc("direct_flex_unavailable")
                return _json(Outcome.error(429, code="resource_unavailable", message=(
                    "Resource Unavailable: flex processing has no capacity for this request now; retry later or "
                    "use the default service tier.")).error_body(), 429)
        if not custom_id:
            return _json(_tiered(answers.answer(endpoint, body, "direct"), tier, endpoint))
        # a client request id names the request as a custom_id does: the same outcome rules apply
        outcome = self.rules.outcome_for(custom_id)
        if outcome.kind == "error":
            return _json(outcome.error_body(), outcome.status)
        if outcome.kind != "success":
            return _json(Outcome.error(408, code="request_timeout", message=outcome.message).error_body(), 408)
        self.counters.inc("direct_requests_answered")
        answer = answers.answer(endpoint, body, custom_id, outcome.content)
        answers.shape_answer(answer, outcome.finish_reason, outcome.refusal)
        return _json(_tiered(answer, tier, endpoint), headers={CLIENT_REQUEST_ID_HEADER: custom_id})

    async def get_config(self, request: web.Request) -> web.Response:
        return _json(self.config_view())

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json(loads=orjson.loads)
            self.configure(**changes)
        except (ValueError, TypeError, KeyError) as exc:
            raise APIError(400, f"Invalid settings: {exc}", "invalid_value") from None
        return _json(self.config_view())

    async def get_counters(self, request: web.Request) -> web.Response:
        return _json(self.counters.snapshot())

    def age(self, ids: list[str], seconds: float) -> list[str]:
        """Move the timestamps of these files and batches ``seconds`` into the past (to test clean-ups by age).

        :returns: the ids that were found.
        """
        shift, found = int(seconds), []
        for object_id in ids:
            if (file := self.store.files.get(object_id)) is not None:
                file.created_at -= shift
                if file.expires_at is not None:
                    file.expires_at -= shift
                self.store.save_file(file)
            elif (batch := self.store.batches.get(object_id)) is not None:
                for key, value in batch.api.items():
                    if key.endswith("_at") and isinstance(value, int):
                        batch.api[key] = value - shift
                self.store.save_batch(batch)
            else:
                continue
            found.append(object_id)
        return found

    async def post_age(self, request: web.Request) -> web.Response:
        data = await request.json(loads=orjson.loads)
        if not isinstance(data, dict) or not isinstance(data.get("ids"), list):
            raise APIError(400, 'Expected {"ids": [...], "seconds": N}.', "invalid_value")
        return _json({"aged": self.age([str(i) for i in data["ids"]], float(data.get("seconds", 0)))})

    async def post_reset(self, request: web.Request) -> web.Response:
        self.counters.reset()
        self.rules.set_outcomes([])
        self.rules.set_faults([])
        return _json(self.counters.snapshot())

    # --- start / stop ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.web_runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.web_runner.setup()
        site = web.TCPSite(self.web_runner, self.config.host, self.config.port, backlog=4096)
        await site.start()
        self.port = int(self.web_runner.addresses[0][1])
        self.runner.resume_all()

    async def stop(self) -> None:
        await self.runner.stop()
        if self.web_runner is not None:
            await self.web_runner.cleanup()
        self.store.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _rule_dict(rule: OutcomeRule) -> dict[str, Any]:
    return {"pattern": rule.pattern, "outcome": vars(rule.outcome), "times": rule.times}


def _fault_dict(fault: Fault) -> dict[str, Any]:
    return dict(vars(fault))
