"""An in-memory OpenAI Files/Batches API behind ``httpx2.MockTransport``, for fast unit tests of one layer.

Inject it through the SDK's ``http_client=`` (``OpenAIBatchHook(conn_id, client_options={"http_client": ...})``);
the same :class:`FakeBatchAPI` serves a sync and an async client, on OpenAI (``/v1/...``) and Azure
(``/openai/...?api-version=``) routes. Batch statuses follow a script per batch: each retrieve moves one step.
For end-to-end tests use the real HTTP server in :mod:`airflow_provider_synth.server.server`.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx2

_ROUTE_PREFIX = re.compile(r"^/(?:openai/)?(?:v1/)?")


@dataclass
class SeenRequest:
    """One request the fake received: enough to assert auth headers and routes."""

    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]


@dataclass
class FakeBatchAPI:
    """State and routes of the fake API. Call :meth:`sync_client` / :meth:`async_client` to talk to it.

    :param statuses: default status script of a new batch, one step per retrieve; the last one sticks.
    """

    statuses: list[str] = field(default_factory=lambda: ["validating", "in_progress", "completed"])
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    scripts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seen: list[SeenRequest] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    faults: list[int] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    # -- test controls ---------------------------------------------------------------------------------------

    def fail_next(self, *status_codes: int) -> None:
        """Answer the next requests with these HTTP status codes (one each), before serving normally."""
        self.faults.extend(status_codes)

    def add_batch(self, steps: list[str | dict[str, Any]], **fields: Any) -> str:
        """Create a batch directly, with a status script; a step may be a status or a dict of fields."""
        batch_id = self._new_id("batch")
        self.batches[batch_id] = self._batch_body(batch_id, fields)
        self.scripts[batch_id] = [s if isinstance(s, dict) else {"status": s} for s in steps]
        return batch_id

    def sync_client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle))

    def async_client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=httpx2.MockTransport(self.handle))

    # -- routes ----------------------------------------------------------------------------------------------

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = _ROUTE_PREFIX.sub("", request.url.path)
        self.seen.append(
            SeenRequest(request.method, request.url.path, dict(request.headers), dict(request.url.params))
        )
        if self.faults:
            code = self.faults.pop(0)
            return httpx2.Response(code, json={"error": {"message": f"injected {code}", "type": "server_error"}})
        parts = path.strip("/").split("/")
        route = (request.method, parts[0], len(parts))
        if route == ("GET", "models", 1):
            return self._json({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model",
                                                           "created": 0, "owned_by": "system"}]})
        if parts[0] == "files":
            return self._files(request, parts)
        if parts[0] == "batches":
            return self._batches(request, parts)
        return httpx2.Response(404, json={"error": {"message": f"no route {request.method} {path}"}})

    def _files(self, request: httpx2.Request, parts: list[str]) -> httpx2.Response:
        if request.method == "POST" and len(parts) == 1:
            request.read()
            filename, content, purpose = _parse_multipart(request)
            file_id = self._new_id("file")
            self.counters["files_created"] += 1
            self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": _now(),
                                   "filename": filename, "purpose": purpose, "status": "processed",
                                   "content": content}
            return self._json(_public(self.files[file_id]))
        if request.method == "GET" and len(parts) == 1:
            purpose = request.url.params.get("purpose")
            data = [_public(f) for f in self.files.values() if purpose in (None, f["purpose"])]
            return self._json({"object": "list", "data": data, "has_more": False})
        file = self.files.get(parts[1])
        if file is None:
            return httpx2.Response(404, json={"error": {"message": f"No such File object: {parts[1]}"}})
        if request.method == "GET" and len(parts) == 3 and parts[2] == "content":
            return httpx2.Response(200, content=file["content"])
        if request.method == "DELETE":
            del self.files[parts[1]]
            return self._json({"id": parts[1], "object": "file", "deleted": True})
        return self._json(_public(file))

    def _batches(self, request: httpx2.Request, parts: list[str]) -> httpx2.Response:
        if request.method == "POST" and len(parts) == 1:
            body = json.loads(request.read())
            batch_id = self._new_id("batch")
            self.counters["batches_created"] += 1
            self.batches[batch_id] = self._batch_body(batch_id, body)
            self.scripts[batch_id] = [{"status": s} for s in self.statuses]
            return self._json(self.batches[batch_id])
        if request.method == "GET" and len(parts) == 1:
            return self._list_batches(request)
        batch = self.batches.get(parts[1])
        if batch is None:
            return httpx2.Response(404, json={"error": {"message": f"No batch found with id '{parts[1]}'."}})
        if request.method == "POST" and parts[-1] == "cancel":
            self.counters["batches_cancelled"] += 1
            batch["status"] = "cancelling"
            self.scripts[parts[1]] = [{"status": "cancelled"}]
            return self._json(batch)
        self.counters["batches_retrieved"] += 1
        script = self.scripts.get(parts[1]) or []
        if script:
            batch.update(script[0] if len(script) == 1 else script.pop(0))
        return self._json(batch)

    def _list_batches(self, request: httpx2.Request) -> httpx2.Response:
        newest_first = sorted(self.batches.values(), key=lambda b: (b["created_at"], b["id"]), reverse=True)
        after = request.url.params.get("after")
        if after:
            ids = [b["id"] for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :]
        limit = int(request.url.params.get("limit", 20))
        page = newest_first[:limit]
        return self._json({"object": "list", "data": page, "has_more": len(newest_first) > limit,
                           "first_id": page[0]["id"] if page else None,
                           "last_id": page[-1]["id"] if page else None})

    # -- helpers ---------------------------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}"

    def _batch_body(self, batch_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        body = {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file_x",
                "completion_window": "24h", "status": "validating", "created_at": _now(),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "output_file_id": None, "error_file_id": None, "metadata": None}
        body.update({k: v for k, v in fields.items() if k in body or k == "errors"})
        return body

    @staticmethod
    def _json(body: dict[str, Any]) -> httpx2.Response:
        return httpx2.Response(200, json=body, headers={"x-request-id": "req_fake"})


def _now() -> int:
    return int(time.time())


def _public(file: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in file.items() if k != "content"}


def _parse_multipart(request: httpx2.Request) -> tuple[str, bytes, str]:
    """Return (filename, file bytes, purpose) of an SDK file upload."""
    boundary = request.headers["content-type"].split("boundary=", 1)[1].encode()
    filename, content, purpose = "", b"", ""
    for part in request.content.split(b"--" + boundary):
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        data = data[:-2] if data.endswith(b"\r\n") else data
        name = re.search(rb'name="([^"]*)"', head)
        fname = re.search(rb'filename="([^"]*)"', head)
        if fname:
            filename, content = fname.group(1).decode(), data
        elif name and name.group(1) == b"purpose":
            purpose = data.decode()
    return filename, content, purpose
