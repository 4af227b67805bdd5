"""Batch lifecycle of the local Batch API server: check the input, run the requests, write the output files.

A batch moves ``validating -> in_progress -> finalizing -> completed`` on the configured schedule, or to
``failed``, ``expired``, ``cancelling -> cancelled``. Requests run in steps so ``request_counts`` move while
the batch is ``in_progress``; every step is committed to the store, so a restarted server resumes the batch
where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import orjson

from airflow_provider_synth.batch.results import error_line, success_line
from airflow_provider_synth.server import answers
from airflow_provider_synth.server.config import Outcome, Rules, ServerConfig
from airflow_provider_synth.server.state import BatchRecord, FileRecord, Store, new_id

log = logging.getLogger(__name__)

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/completions", "/v1/moderations")
#: Endpoints answered by the stand-in even in gateway mode: an OpenAI-compatible engine (vLLM) has no moderation
#: classifier.
LOCAL_ENDPOINTS = ("/v1/moderations",)
MAX_EMBEDDING_INPUTS = 50_000
MAX_PROBLEMS = 20
#: Steps this small run inline on the event loop; larger ones go to a worker thread.
INLINE_ITEMS = 64
#: Output files this small are published inline too (1,000 batches finishing together stay quick).
INLINE_BYTES = 1 << 16
#: A streaming processor's answers are committed at least this often (seconds), as they land.
COMMIT_EVERY_S = 1.0

#: what an ``Outcome.unreadable()`` line holds: a proxy's error page where a JSON line should be
BAD_GATEWAY_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
_NULL_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "request_timeout": "This request timed out.",
}


def normalize_endpoint(url: str) -> str:
    """``/chat/completions`` (Azure) and ``/v1/chat/completions`` (OpenAI) name the same endpoint."""
    return url if url.startswith("/v1/") else "/v1" + url


@dataclass
class Item:
    """One request line of a batch input file."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass
class Result:
    """One output line, and whether it belongs in the output file (success) or the error file."""

    ok: bool
    line: bytes
    usage: tuple[int, int, int, int] | None = None


@dataclass
class InputCheck:
    """What checking a batch input file found: its size, model and the first problems (OpenAI ``BatchError``)."""

    total: int = 0
    model: str | None = None
    tokens: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append({"code": code, "message": message, "line": line, "param": param})


def _check_line(check: InputCheck, lineno: int, raw: bytes, endpoint: str, seen: set[str]) -> int:
    """Check one input line; return its number of embedding inputs."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        check.problem("invalid_json_line", "This line is not parseable as valid JSON.", lineno)
        return 0
    if not isinstance(obj, dict):
        check.problem("invalid_json_line", "This line is not a JSON object.", lineno)
        return 0
    cid, body = obj.get("custom_id"), obj.get("body")
    if not isinstance(cid, str) or not cid:
        check.problem("missing_required_parameter", "Missing required parameter: 'custom_id'.", lineno, "custom_id")
    elif cid in seen:
        check.problem("duplicate_custom_id", f"The custom_id '{cid}' is used more than once.", lineno, "custom_id")
    else:
        seen.add(cid)
    if obj.get("method") != "POST":
        check.problem("invalid_method", "The method must be 'POST'.", lineno, "method")
    url = obj.get("url")
    if not isinstance(url, str) or normalize_endpoint(url) != endpoint:
        check.problem("invalid_url", f"The url {url!r} does not match the batch endpoint {endpoint!r}.", lineno, "url")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        check.problem("missing_required_parameter", "Missing required parameter: 'body.model'.", lineno, "body.model")
        return 0
    if check.model is None:
        check.model = body["model"]
    elif body["model"] != check.model:
        check.problem(
            "mismatched_model", f"All requests must use the same model; expected {check.model!r}.", lineno, "body.model"
        )
    check.tokens += answers.input_tokens(body)
    inputs = body.get("input")
    return len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1


def check_input(path: Path, endpoint: str, max_requests: int) -> InputCheck:
    """Check a batch input file the way the Batch API does (streamed; custom_ids are kept to find duplicates)."""
    check, seen, embedding_inputs = InputCheck(), set[str](), 0
    with path.open("rb") as fp:
        for lineno, raw in enumerate(fp, start=1):
            if not raw.strip():
                continue
            check.total += 1
            embedding_inputs += _check_line(check, lineno, raw, endpoint, seen)
    if check.total == 0:
        check.problem("empty_file", "The input file is empty.")
    if check.total > max_requests:
        check.problem("too_many_requests", f"A batch holds at most {max_requests} requests; got {check.total}.")
    if endpoint == "/v1/embeddings" and embedding_inputs > MAX_EMBEDDING_INPUTS:
        check.problem(
            "too_many_inputs", f"An embeddings batch holds at most {MAX_EMBEDDING_INPUTS} inputs; got {embedding_inputs}."
        )
    return check


def iter_items(path: Path, skip: int = 0) -> Generator[Item, None, None]:
    """The request lines of an input file, after the first ``skip`` requests.

    The file is opened now, not at the first item, so it stays readable if it is deleted meanwhile.
    """
    return _items(path.open("rb"), skip)


def _items(fp: BinaryIO, skip: int) -> Generator[Item, None, None]:
    with fp:
        index = 0
        for lineno, raw in enumerate(fp, start=1):
            if not raw.strip():
                continue
            index += 1
            if index <= skip:
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                body = obj.get("body")
                yield Item(lineno, str(obj.get("custom_id")), str(obj.get("url")), body if isinstance(body, dict) else {})


def output_line(custom_id: str, status_code: int, body: dict[str, Any]) -> bytes:
    """An output-file line with an HTTP response (a success, or an HTTP error with ``body.error``)."""
    line = success_line(custom_id, body, status_code=status_code, request_id=new_id("req_", 32),
                        line_id=new_id("batch_req_", 32))
    return line + b"\n"


def null_line(custom_id: str, code: str, message: str | None = None) -> bytes:
    """An error-file line without a response (``batch_expired``, ``batch_cancelled``, ``request_timeout``)."""
    line = error_line(custom_id, code, message or _NULL_MESSAGES.get(code, code), line_id=new_id("batch_req_", 32))
    return line + b"\n"


def outcome_result(item: Item, outcome: Outcome) -> Result:
    """The result of a request whose outcome is not a success (or a success answered locally)."""
    if outcome.kind == "success":
        body = answers.answer(item.url, item.body, item.custom_id, outcome.content)
        answers.shape_answer(body, outcome.finish_reason, outcome.refusal)
        return Result(True, output_line(item.custom_id, 200, body), answers.usage_of(body))
    if outcome.kind == "error":
        return Result(False, output_line(item.custom_id, outcome.status, outcome.error_body()))
    if outcome.kind == "unreadable":  # in the output file, counted as completed: the service thinks it answered
        return Result(True, (outcome.content or BAD_GATEWAY_PAGE).replace("\n", " ").encode() + b"\n")
    if outcome.kind == "cut_off":
        body = answers.answer(item.url, item.body, item.custom_id, None)
        line = output_line(item.custom_id, 200, body)
        return Result(True, line[: len(line) // 2] + b"\n")
    return Result(False, null_line(item.custom_id, outcome.kind, outcome.message))


class Processor(Protocol):
    """Runs the requests of one step of a batch."""

    async def run(self, items: list[Item]) -> list[Result]: ...


class StreamingProcessor(Processor, Protocol):
    """Runs requests one by one, as many at once as it decides (the gateway): the runner keeps ``window`` of a
    batch's requests on their way and commits their answers as they land, in input order."""

    @property
    def window(self) -> int: ...

    async def submit(self, item: Item) -> Result: ...


class LocalProcessor:
    """Answers every request locally, deterministically, following the outcome rules.

    :param rules: the outcome rules.
    """

    def __init__(self, rules: Rules) -> None:
        self.rules = rules

    def run_sync(self, items: list[Item]) -> list[Result]:
        return [outcome_result(item, self.rules.outcome_for(item.custom_id)) for item in items]

    async def run(self, items: list[Item]) -> list[Result]:
        if len(items) <= INLINE_ITEMS:
            return self.run_sync(items)
        return await asyncio.to_thread(self.run_sync, items)


class Counters:
    """Thread-safe counters of everything the server did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._routes: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def route(self, name: str) -> None:
        with self._lock:
            self._routes[name] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            data: dict[str, Any] = {
                name: 0
                for name in (
                    "files_created", "files_deleted", "output_files_created", "bytes_uploaded", "batches_created",
                    "batches_cancelled", "batches_completed", "batches_failed", "batches_expired",
                    "batches_rejected", "requests_processed", "batch_polls", "faults_injected", "direct_requests",
                    "message_batches_created", "message_batch_polls", "message_batch_results",
                )
            }
            data.update(self._counts)
            data["http_requests"] = dict(self._routes)
            data["http_requests_total"] = sum(self._routes.values())
            return data

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._routes.clear()


def _append(path: Path, lines: list[bytes]) -> int:
    with path.open("ab") as fp:
        fp.write(b"".join(lines))
        return fp.tell()


def _publish(store: Store, work: Path, size: int, name: str, seed: str | None) -> FileRecord | None:
    """Turn a work file into a ``batch_output`` file (lines shuffled when ``seed`` is set).

    Runs in a worker thread, so it leaves registering the file to the caller, on the event loop.
    """
    if size == 0:
        work.unlink(missing_ok=True)
        return None
    record = FileRecord(new_id("file-"), name, "batch_output", size, int(time.time()))
    target = store.file_path(record.id)
    with work.open("rb") as src, target.open("wb") as dst:
        if seed is None:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        else:
            spans, offset = [], 0
            for raw in src:
                spans.append((offset, len(raw)))
                offset += len(raw)
            random.Random(seed).shuffle(spans)
            for start, length in spans:
                src.seek(start)
                dst.write(src.read(length))
    work.unlink(missing_ok=True)
    return record


class BatchRunner:
    """Runs every batch of the server as one asyncio task.

    :param store: files and batches.
    :param config: returns the current settings (they can change while batches run).
    :param processor: runs each step's requests.
    :param counters: the server's counters.
    """

    def __init__(
        self, store: Store, config: Callable[[], ServerConfig], processor: Processor, counters: Counters
    ) -> None:
        self.store = store
        self.config = config
        self.processor = processor
        self.counters = counters
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}

    def start(self, batch: BatchRecord) -> None:
        """Run (or resume) ``batch`` in the background."""
        self._wake[batch.id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run(batch), name=f"synth-batch-{batch.id}")
        self._tasks[batch.id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(batch.id, None))

    def resume_all(self) -> None:
        """Resume the unfinished batches of a store opened again (work files cut to their last commit)."""
        for batch in self.store.batches.values():
            if batch.status in ("validating", "in_progress", "finalizing", "cancelling"):
                for path, size in zip(self.store.work_paths(batch.id), (batch.out_bytes, batch.err_bytes), strict=True):
                    if path.exists():
                        with path.open("r+b") as fp:
                            fp.truncate(size)
                log.info("resuming batch %s (%s, %d done)", batch.id, batch.status, batch.processed)
                self.start(batch)

    def cancel(self, batch: BatchRecord) -> None:
        batch.set_status("cancelling", "cancelling_at")
        self.store.save_batch(batch)
        self.wake(batch.id)

    def wake(self, batch_id: str) -> None:
        event = self._wake.get(batch_id)
        if event is not None:
            event.set()

    def polled(self, batch: BatchRecord) -> None:
        if batch.first_poll_at is None:
            batch.first_poll_at = time.time()
            self.wake(batch.id)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        close = getattr(self.processor, "close", None)
        if close is not None:
            await close()

    async def _sleep(self, batch: BatchRecord, seconds: float) -> None:
        """Sleep, but wake early when the batch is cancelled or polled."""
        event = self._wake[batch.id]
        if seconds > 0:
            try:
                await asyncio.wait_for(event.wait(), timeout=seconds)
            except TimeoutError:
                pass
        event.clear()

    async def _run(self, batch: BatchRecord) -> None:
        try:
            if batch.status == "validating" and not await self._validate(batch):
                return
            if batch.status == "in_progress":
                await self._progress(batch)
            await self._finish(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch %s failed in the local server", batch.id)
            self._fail(batch, [{"code": "server_error", "message": f"{type(exc).__name__}: {exc}", "line": None}])

    def _fail(self, batch: BatchRecord, problems: list[dict[str, Any]]) -> None:
        batch.api["errors"] = {"object": "list", "data": problems}
        self.counters.inc("batches_failed")  # before the status: see _finish
        batch.set_status("failed", "failed_at")
        self.store.save_batch(batch)
        self.store.release_input(batch)

    async def _validate(self, batch: BatchRecord) -> bool:
        cfg = self.config()
        await self._sleep(batch, cfg.validating_s)
        if batch.status == "cancelling":
            return True
        if batch.fail:
            self._fail(batch, [{"code": "batch_failed", "message": "Injected batch failure.", "line": None}])
            return False
        if batch.api["request_counts"]["total"] == 0:
            path = self.store.input_path(batch)
            check = await asyncio.to_thread(check_input, path, normalize_endpoint(batch.api["endpoint"]), cfg.max_requests)
            if check.problems:
                self._fail(batch, check.problems)
                return False
            batch.api["request_counts"]["total"] = check.total
            batch.api["model"] = check.model
            batch.tokens = check.tokens
        if batch.status == "cancelling":  # cancelled while the input was being checked (an await above)
            return True
        over = self._over_token_limit(batch, cfg.enqueued_token_limit)
        if over:
            self._fail(batch, [{"code": "token_limit_exceeded", "message": over, "line": None}])
            return False
        batch.set_status("in_progress", "in_progress_at")
        self.store.save_batch(batch)
        return True

    def _over_token_limit(self, batch: BatchRecord, limit: int | None) -> str | None:
        """OpenAI's message when this batch's input tokens would exceed the model's enqueued-token limit."""
        if limit is None:
            return None
        model = batch.api["model"]
        queued = sum(b.tokens for b in self.store.batches.values()
                     if b.status in ("in_progress", "finalizing") and b.api["model"] == model)
        if queued + batch.tokens <= limit:
            return None
        return (f"Enqueued token limit reached for {model} in organization org-synth-local. Limit: {limit:,} "
                f"enqueued tokens ({queued:,} queued, this batch {batch.tokens:,}). Please try again once some "
                "in_progress batches have been completed.")

    def _limit(self, batch: BatchRecord) -> int:
        total = int(batch.api["request_counts"]["total"])
        return total if batch.expire_after is None else min(total, batch.expire_after)

    async def _progress(self, batch: BatchRecord) -> None:
        cfg = self.config()
        total, limit = batch.api["request_counts"]["total"], self._limit(batch)
        steps = cfg.progress_steps
        interval = cfg.in_progress_s / steps
        if cfg.complete_after_first_poll_s is not None:
            while batch.first_poll_at is None and batch.status == "in_progress":
                await self._sleep(batch, 3600)
            if batch.first_poll_at is not None:
                await self._sleep(batch, batch.first_poll_at + cfg.complete_after_first_poll_s - time.time())
            steps, interval = 1, 0.0
        if hasattr(self.processor, "submit"):
            await self._stream(batch, limit, self.processor)  # type: ignore[arg-type]
            return
        chunk = max(1, math.ceil(total / steps))
        max_chunk = getattr(self.processor, "max_chunk", None)
        if max_chunk and chunk > max_chunk:
            chunk = max_chunk
            interval = interval * steps / math.ceil(total / chunk)
        items = iter_items(self.store.input_path(batch), batch.processed)
        try:
            while batch.processed < limit and batch.status == "in_progress":
                await self._sleep(batch, interval)
                if batch.status != "in_progress":
                    break
                step = [item for _, item in zip(range(min(chunk, limit - batch.processed)), items, strict=False)]
                if not step:
                    break
                await self._commit(batch, step, await self.processor.run(step))
        finally:
            items.close()

    async def _stream(self, batch: BatchRecord, limit: int, processor: StreamingProcessor) -> None:
        """Keep ``processor.window`` requests on their way and commit the answered prefix at least every
        second (``request_counts`` move as answers land; a restart resumes after the last committed one)."""
        items = iter_items(self.store.input_path(batch), batch.processed)
        pending: deque[tuple[Item, asyncio.Task[Result]]] = deque()
        wake = self._wake[batch.id]
        last_commit = time.monotonic()
        try:
            while batch.status == "in_progress":
                while len(pending) < processor.window and batch.processed + len(pending) < limit:
                    item = next(items, None)
                    if item is None:
                        break
                    pending.append((item, asyncio.ensure_future(processor.submit(item))))
                if not pending:
                    break
                answered = next((i for i, (_, task) in enumerate(pending) if not task.done()), len(pending))
                if answered and (answered == len(pending) or time.monotonic() - last_commit >= COMMIT_EVERY_S):
                    done = [pending.popleft() for _ in range(answered)]
                    await self._commit(batch, [item for item, _ in done], [task.result() for _, task in done])
                    last_commit = time.monotonic()
                    continue
                woken = asyncio.ensure_future(wake.wait())
                await asyncio.wait([pending[answered][1], woken], return_when=asyncio.FIRST_COMPLETED,
                                   timeout=max(0.01, COMMIT_EVERY_S - (time.monotonic() - last_commit)))
                woken.cancel()
                wake.clear()
        finally:
            items.close()
            for _, task in pending:
                task.cancel()
            await asyncio.gather(*(task for _, task in pending), return_exceptions=True)

    async def _commit(self, batch: BatchRecord, step: list[Item], results: list[Result]) -> None:
        out_path, err_path = self.store.work_paths(batch.id)
        good = [r.line for r in results if r.ok]
        bad = [r.line for r in results if not r.ok]
        write: Callable[[Path, list[bytes]], Awaitable[int]] = (
            _append_inline if len(step) <= INLINE_ITEMS else _append_thread
        )
        if good:
            batch.out_bytes = await write(out_path, good)
        if bad:
            batch.err_bytes = await write(err_path, bad)
        for r in results:
            if r.usage is not None:
                batch.usage = [a + b for a, b in zip(batch.usage, r.usage, strict=True)]
        counts = batch.api["request_counts"]
        counts["completed"] += len(good)
        counts["failed"] += len(bad)
        batch.processed += len(step)
        self.store.save_batch(batch)
        self.counters.inc("requests_processed", len(step))

    async def _finish(self, batch: BatchRecord) -> None:
        cfg = self.config()
        total = batch.api["request_counts"]["total"]
        if batch.status == "cancelling":
            await self._sleep(batch, cfg.cancelling_s)
            final, stamp, rest = "cancelled", "cancelled_at", "batch_cancelled"
        elif batch.processed < total:
            final, stamp, rest = "expired", "expired_at", "batch_expired"
        else:
            final, stamp, rest = "completed", "completed_at", None
            if batch.status != "finalizing":
                batch.set_status("finalizing", "finalizing_at")
                self.store.save_batch(batch)
            await self._sleep(batch, cfg.finalizing_s)
        out_path, err_path = self.store.work_paths(batch.id)
        if rest is not None and batch.processed < total:
            rest_lines = [null_line(item.custom_id, rest)
                          for item in iter_items(self.store.input_path(batch), batch.processed)]
            batch.err_bytes = await _append_thread(err_path, rest_lines)
            # the counts describe the files: every line of the error file is a failed request
            batch.api["request_counts"]["failed"] += len(rest_lines)
        seed = f"{cfg.seed}:{batch.id}" if cfg.shuffle_output else None
        for key, path, size, name in (
            ("output_file_id", out_path, batch.out_bytes, f"{batch.id}_output.jsonl"),
            ("error_file_id", err_path, batch.err_bytes, f"{batch.id}_error.jsonl"),
        ):
            if size <= INLINE_BYTES:
                record = _publish(self.store, path, size, name, seed)
            else:
                record = await asyncio.to_thread(_publish, self.store, path, size, name, seed)
            if record is not None:
                if batch.output_expires_s is not None:
                    record.expires_at = record.created_at + batch.output_expires_s
                self.store.add_file(record)
                self.counters.inc("output_files_created")
            batch.api[key] = record.id if record is not None else None
        batch.api["usage"] = batch.usage_api()
        # count first: whoever sees the final status (a test's wait_idle) must see the counter too
        self.counters.inc(f"batches_{final}")
        batch.set_status(final, stamp)
        self.store.save_batch(batch)
        self.store.release_input(batch)


async def _append_inline(path: Path, lines: list[bytes]) -> int:
    return _append(path, lines)


async def _append_thread(path: Path, lines: list[bytes]) -> int:
    return await asyncio.to_thread(_append, path, lines)
