"""The pipelined engine loop: a :class:`Processor` keeps the engine busy and turns finished outputs into
output lines; an :class:`OutputWriter` appends them in whole lines, flushed and synced.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from airflow_provider_synth.batch.requests import CHAT, scoring_pairs
from airflow_provider_synth.batch.results import error_line, success_line
from airflow_provider_synth.engine.vllm.codecs import Codec, embedding_prompts, encode_embedding
from airflow_provider_synth.engine.vllm.config import GENERATE_URLS, Request, RunnerConfig, pooling_kind
from airflow_provider_synth.engine.vllm.resume import Rechecks


def classify_error(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) of an exception the engine raised for a request."""
    text = str(exc)
    if (getattr(exc, "parameter", None) == "input_tokens" or "maximum context length" in text
            or "longer than the maximum model length" in text):
        return 400, "context_length_exceeded"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"VLLMClientError", "ValueError", "TypeError", "KeyError", "TemplateError"}:
        return 400, "invalid_request"
    return 500, "server_error"


def _engine_dead(exc: BaseException) -> bool:
    return any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__)


@dataclass
class Tally:
    """Running totals for progress events."""

    done: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: unusable answers whose request was asked again (their tokens are counted, the request is not done)
    retried: int = 0


@dataclass
class _InFlight:
    req: Request
    state: Any
    ids: tuple[str, ...]


class Processor:
    """Drives one engine: requests in (:meth:`submit`), finished answers out (:meth:`step`) as output lines.
    Engine-agnostic enough to unit test: ``llm`` needs ``llm_engine.step()`` and ``embed``; the ``codec`` adds
    requests and builds response bodies.

    :param llm: a ``vllm.LLM``.
    :param cfg: the run's configuration.
    :param codec: maps requests onto the engine and outputs onto bodies (:class:`Codec`).
    :param make_pooling: builds ``PoolingParams`` from keyword arguments (embeddings).
    :param url: the run's endpoint (a pooling run serves embeddings, or scores and reranks).

    Its ``rechecks`` (:class:`Rechecks`, set by :func:`run`) ask requests with unusable answers again.
    """

    rechecks: Rechecks | None = None

    def __init__(self, llm: Any, cfg: RunnerConfig, codec: Codec, make_pooling: Callable[..., Any],
                 url: str = CHAT) -> None:
        self.llm = llm
        self.cfg = cfg
        self.codec = codec
        self.make_pooling = make_pooling
        self.served = frozenset(cfg.served_names())
        self.model_name = cfg.served_names()[0]
        self.tally = Tally()
        self._pending: dict[str, _InFlight] = {}
        self.in_flight = 0
        #: what a pooling run does: "embed", or "score" (``/score`` and ``/rerank`` through ``LLM.score``)
        self.pool_kind = "score" if pooling_kind(url) in ("score", "rerank") else "embed"

    # --------------------------------------------------------------------------------------- generation

    def submit(self, req: Request) -> bytes | None:
        """Add one request to the engine; return its error line (newline-terminated) when it is refused."""
        refused = self._unserved_model(req)
        if refused is not None:
            return refused
        try:
            if req.url not in GENERATE_URLS:
                raise ValueError(f"the vLLM runner does not serve {req.url!r} in a generation run")
            ids, state = self.codec.enqueue(req)
        except Exception as exc:  # a bad value in one body must not stop the run
            if _engine_dead(exc):
                raise
            return self._error(req, exc)
        # vLLM returns its internal id ("<id>-<random>"), and its outputs carry the id it was given
        keys = tuple({i for rid in ids for i in (rid, rid.rsplit("-", 1)[0])})
        entry = _InFlight(req, state, keys)
        for key in keys:
            self._pending[key] = entry
        self.in_flight += 1
        return None

    def _unserved_model(self, req: Request) -> bytes | None:
        """The 404 line vLLM's server writes for a ``model`` it does not serve (a line without one is served)."""
        model = req.body.get("model")
        if not model or model in self.served:
            return None
        return self._count_failure(error_line(
            req.custom_id, "model_not_found",
            f"The model `{model}` does not exist. Valid aliases: {', '.join(sorted(self.served))}.",
            status_code=404, request_id=f"vllm-{uuid.uuid4().hex}"))

    def step(self) -> list[bytes]:
        """Run one engine step; return the output lines of the requests it finished."""
        engine = self.llm.llm_engine
        if not engine.has_unfinished_requests():
            return self._lost()
        lines = []
        for out in engine.step():
            if not out.finished:
                continue
            entry = self._pending.get(out.request_id)
            if entry is None:
                continue
            for key in entry.ids:
                self._pending.pop(key, None)
            self.in_flight -= 1
            lines.extend(self._line(entry, out))
        return lines

    def _lost(self) -> list[bytes]:
        """Requests the engine no longer holds but never answered: retryable error lines, never a hang."""
        lost = {id(e): e for e in self._pending.values()}.values()
        self._pending.clear()
        self.in_flight = 0
        return [self._count_failure(error_line(e.req.custom_id, "server_error", "the engine returned no answer",
                                               status_code=500)) for e in lost]

    def _line(self, entry: _InFlight, out: Any) -> list[bytes]:
        """The output line of a finished request; an unusable answer's request is added again (its line first,
        then the error line of a retry the engine refuses)."""
        req = entry.req
        rid = f"vllm-{uuid.uuid4().hex}"
        bad = [c for c in out.outputs if c.finish_reason in ("abort", "error")]
        if bad or getattr(out, "error", None) is not None:
            msg = str(getattr(out, "error", None) or f"generation ended with {bad[0].finish_reason!r}")
            return [self._count_failure(error_line(req.custom_id, "server_error", msg, status_code=500,
                                                   request_id=rid))]
        try:
            body = self.codec.body(req, entry.state, out, rid)
        except Exception as exc:  # a parser that chokes on one answer must not stop the run
            return [self._error(req, exc, status=500)]
        line = success_line(req.custom_id, body, request_id=rid) + b"\n"
        rechecks = self.rechecks
        kind = rechecks.judge(req.custom_id, line[:-1]) if rechecks is not None else None
        self._count(len(out.prompt_token_ids or ()), sum(len(c.token_ids) for c in out.outputs), done=kind is None)
        if kind is None or rechecks is None:
            return [line]
        self.tally.retried += 1  # the unusable answer is written (it was paid for), and asked again at once
        refused = self.submit(rechecks.again(req))
        return [line] if refused is None else [line, refused]

    # ------------------------------------------------------------------------------ embeddings, scores

    def pool_chunk(self, chunk: list[Request]) -> list[bytes]:
        """Answer one chunk of embeddings (or score and rerank) requests in one engine call; return its output
        lines in the chunk's order."""
        lines: dict[str, bytes] = {}
        items: list[tuple[Request, Any]] = []
        for req in chunk:
            refused = self._unserved_model(req)
            if refused is not None:
                lines[req.custom_id] = refused
                continue
            try:
                items.append((req, self._pool_input(req)))
            except Exception as exc:
                lines[req.custom_id] = self._error(req, exc)
        for req, line in self._isolate(items):
            lines[req.custom_id] = line
        return [lines[req.custom_id] for req in chunk]

    def _pool_input(self, req: Request) -> Any:
        kind = pooling_kind(req.url)
        if kind is None or (kind == "embed") != (self.pool_kind == "embed"):
            raise ValueError(f"the vLLM runner does not serve {req.url!r} in a {self.pool_kind} run")
        if kind == "embed":
            dims = req.body.get("dimensions")
            params = self.make_pooling(dimensions=dims) if dims else self.make_pooling()
            return [(p, params) for p in embedding_prompts(req.body.get("input"))]
        return list(zip(*scoring_pairs(req.url, req.body), strict=True))

    def _isolate(self, items: list[tuple[Request, Any]]) -> list[tuple[Request, bytes]]:
        """Pool ``items`` in one engine call; when the engine refuses the call, bisect to find the bad
        request(s), so one bad line costs an error line, not the run."""
        if not items:
            return []
        try:
            outputs = self._pool(items)
        except Exception as exc:
            if _engine_dead(exc):
                raise
            if len(items) == 1:
                return [(items[0][0], self._error(items[0][0], exc))]
            mid = len(items) // 2
            return self._isolate(items[:mid]) + self._isolate(items[mid:])
        return [(req, self._pooling_line(req, out)) for (req, _), out in zip(items, outputs, strict=True)]

    def _pool(self, items: list[tuple[Request, Any]]) -> list[Any]:
        """One ``LLM.embed`` (or ``LLM.score``) call for every input of every request; regrouped per request."""
        flat = [pair for _, inputs in items for pair in inputs]
        if self.pool_kind == "embed":
            outs = self.llm.embed([p for p, _ in flat], pooling_params=[q for _, q in flat], use_tqdm=False)
        else:
            outs = self.llm.score([q for q, _ in flat], [d for _, d in flat], use_tqdm=False)
        grouped, start = [], 0
        for _, inputs in items:
            grouped.append(outs[start:start + len(inputs)])
            start += len(inputs)
        return grouped

    def _pooling_line(self, req: Request, outs: list[Any]) -> bytes:
        rid = f"vllm-{uuid.uuid4().hex}"
        errors = [o.error for o in outs if getattr(o, "error", None) is not None]
        if errors:
            return self._count_failure(error_line(req.custom_id, "server_error", str(errors[0]), status_code=500,
                                                  request_id=rid))
        prompt = sum(len(o.prompt_token_ids or ()) for o in outs)
        self._count(prompt, 0)
        kind = pooling_kind(req.url)
        if kind == "embed":
            fmt = req.body.get("encoding_format") or "float"
            data = [{"object": "embedding", "index": i, "embedding": encode_embedding(o.outputs.embedding, fmt)}
                    for i, o in enumerate(outs)]
            body: dict[str, Any] = {"object": "list", "data": data, "model": self.model_name,
                                    "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
        elif kind == "rerank":
            body = self._rerank_body(req, outs, rid, prompt)
        else:  # the fields of vLLM's ScoreResponse
            body = {"id": f"score-{rid}", "object": "list", "created": int(time.time()), "model": self.model_name,
                    "data": [{"index": i, "object": "score", "score": o.outputs.score} for i, o in enumerate(outs)],
                    "usage": {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0,
                              "prompt_tokens_details": None, "completion_tokens_details": None}}
        return success_line(req.custom_id, body, request_id=rid) + b"\n"

    def _rerank_body(self, req: Request, outs: list[Any], rid: str, prompt: int) -> dict[str, Any]:
        """vLLM's RerankResponse: documents by relevance, the ``top_n`` first (all when 0)."""
        docs = req.body["documents"] if isinstance(req.body["documents"], list) else [req.body["documents"]]
        results = [{"index": i, "relevance_score": o.outputs.score,
                    "document": ({"text": d, "multi_modal": None} if isinstance(d, str)
                                 else {"text": None, "multi_modal": d.get("content", [])})}
                   for i, (d, o) in enumerate(zip(docs, outs, strict=True))]
        results.sort(key=lambda r: r["relevance_score"], reverse=True)
        top_n = int(req.body.get("top_n") or 0)
        return {"id": f"rerank-{rid}", "model": self.model_name, "usage": {"prompt_tokens": prompt,
                                                                            "total_tokens": prompt},
                "results": results[:top_n] if top_n > 0 else results}

    # ------------------------------------------------------------------------------------------ tallies

    def _error(self, req: Request, exc: BaseException, status: int | None = None) -> bytes:
        code_status, code = classify_error(exc)
        status = status or code_status
        return self._count_failure(error_line(req.custom_id, code if status < 500 else "server_error",
                                              f"{type(exc).__name__}: {exc}", status_code=status))

    def _count_failure(self, line: bytes) -> bytes:
        self.tally.done += 1
        self.tally.failed += 1
        return line + b"\n"

    def _count(self, prompt: int, completion: int, done: bool = True) -> None:
        self.tally.done += done
        self.tally.prompt_tokens += prompt
        self.tally.completion_tokens += completion


class OutputWriter:
    """Appends finished answers to the output file: one ``write`` of whole lines per flush, then ``fsync``, so
    a kill can only tear the file's tail. Flushes when ``max_lines`` answers wait or the oldest has waited
    ``interval`` seconds.

    :param fp: the output file, opened for appending in binary mode.
    :param max_lines: the most answers held in memory.
    :param interval: the most seconds an answer is held.
    :param clock: a monotonic clock (tests pass their own).
    """

    def __init__(self, fp: IO[bytes], max_lines: int, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fp = fp
        self.max_lines = max(1, max_lines)
        self.interval = interval
        self.clock = clock
        self.buffer: list[bytes] = []
        self.since = 0.0
        self.flushes = 0

    def add(self, lines: Sequence[bytes]) -> None:
        if lines and not self.buffer:
            self.since = self.clock()
        self.buffer.extend(lines)

    def due(self) -> bool:
        return bool(self.buffer) and (len(self.buffer) >= self.max_lines
                                      or self.clock() - self.since >= self.interval)

    def flush(self) -> bool:
        """Write, flush and sync what waits; return whether anything was written."""
        if not self.buffer:
            return False
        self.fp.write(b"".join(self.buffer))
        self.fp.flush()
        os.fsync(self.fp.fileno())
        self.buffer.clear()
        self.flushes += 1
        return True


def pipeline(processor: Processor, requests: Iterator[Request], writer: OutputWriter, window: int,
             progress: Callable[[], None]) -> None:
    """The engine loop: keep up to ``window`` requests in the engine, adding one as soon as another finishes,
    and hand each finished answer to ``writer`` (which writes it within its size and time bounds)."""
    exhausted = False
    while True:
        while not exhausted and processor.in_flight < window:
            req = next(requests, None)
            if req is None:
                exhausted = True
            else:
                refused = processor.submit(req)
                if refused is not None:
                    writer.add([refused])
        if processor.in_flight == 0:
            break
        writer.add(processor.step())
        if writer.due() and writer.flush():
            progress()
    if writer.flush():
        progress()


def pool_all(processor: Processor, chunks: Iterator[list[Request]], writer: OutputWriter,
             progress: Callable[[], None]) -> None:
    """Embeddings, scores, reranks: one ``LLM.embed`` or ``LLM.score`` call per chunk (pooling has no decode
    phase to keep busy)."""
    for chunk in chunks:
        writer.add(processor.pool_chunk(chunk))
        writer.flush()
        progress()
