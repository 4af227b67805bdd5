"""The engine side of :class:`~airflow_provider_synth.operators.vllm.VLLMBatchOperator`.

It runs in the vLLM interpreter, not in Airflow's (vLLM cannot share Airflow's environment), and imports only
vLLM, the standard library and this provider's core (``airflow_provider_synth.batch``)::

    python -m airflow_provider_synth.runs.vllm_runner --config run.json

``run.json`` holds ``input`` and ``output`` (local paths), ``model``, ``llm_kwargs`` (for ``vllm.LLM``),
``sampling`` (default sampling parameters, in vLLM's names; each request's body overrides them),
``chunk_size`` (requests in the engine at once, and the most answers held before a write),
``flush_interval`` (seconds between writes), ``served_model_names`` (the names a line's ``model`` may use;
default ``[model]``) and, as ``run_batch``'s flags, ``tool_call_parser``, ``enable_auto_tool_choice`` and
``reasoning_parser``, and ``checks`` (:meth:`OutputChecks.to_spec`) with ``retry_failed_requests``.

* **A pipelined engine loop** (``/v1/chat/completions``, ``/v1/completions``): requests are added to vLLM's
  engine one by one (``LLM.enqueue_chat`` / ``LLM.enqueue``) while ``LLM.llm_engine.step()`` runs it, so the
  engine always has up to ``chunk_size`` requests and no chunk boundary drains it; each answer is appended to
  ``output`` as it finishes, written, flushed and synced every ``chunk_size`` answers or ``flush_interval``
  seconds. Embeddings, ``/score`` and ``/rerank`` (vLLM's fields, as ``run_batch`` writes them) go through
  ``LLM.embed`` / ``LLM.score`` in chunks of ``chunk_size``.
* Chat bodies are answered as vLLM's ``run_batch`` answers them (:mod:`~airflow_provider_synth.runs.vllm_chat`):
  tool calls, reasoning, logprobs, structured outputs, ``system_fingerprint``.
* **Output checks** (``checks``, ``retry_failed_requests`` > 0): a chat or completions answer the checks judge
  unusable (cut off, refused, off-schema; :mod:`airflow_provider_synth.batch.checks`) is written like any
  answer (it was paid for, and the merge accounts it) and its request is added to the engine again at once, alone, with the
  checks' ``retry_body`` for its kind, until the id has had ``retry_failed_requests`` retries; the merge keeps
  the latest answer. Embeddings, scores and reranks have nothing to check.
* A line naming a model the engine does not serve gets a 404 error line (code ``model_not_found``); a request
  the engine refuses (an over-long prompt, a bad sampling value) an error line (400); the run goes on.
* Resume: on start the runner reads ``output``, cuts a torn last line (a kill mid-write), and skips every
  custom_id already answered for good (a success, or a failure a retry cannot fix), so a rerun finishes the
  rest and never answers a finished request twice. With output checks, an id whose latest answer is unusable
  and that has retries left (counted from its unusable answers in ``output``) is asked again, with its retry
  body; one that spent them is finished.
* Progress goes to stdout as JSON lines ``{"synth_vllm": "<event>", ...}`` (events ``start``, ``loaded``,
  ``progress``, ``done``, ``error``), which the operator relays to the task log.
* Exit codes: 0 done, 2 bad configuration, 3 vLLM not importable, 4 the model could not load, 5 the engine
  died mid-run. The model is loaded before any request runs, so 3 and 4 cost nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from airflow_provider_synth.batch.checks import Checker, OutputChecks, Unusable, changed_body
from airflow_provider_synth.batch.jsonl import iter_jsonl, loads
from airflow_provider_synth.batch.requests import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RERANK,
    SCORE,
    VLLM_ENDPOINTS,
    canonical_url,
    scoring_pairs,
)
from airflow_provider_synth.batch.results import error_line, parse_output_line, success_line
from airflow_provider_synth.runs.vllm_process import cpu_dtype, guard_engine

EVENT_KEY = "synth_vllm"
EXIT_BAD_CONFIG = 2
EXIT_NO_VLLM = 3
EXIT_MODEL_LOAD = 4
EXIT_ENGINE = 5

GENERATE_URLS = (CHAT, COMPLETIONS)
_POOLING_KINDS = {EMBEDDINGS: "embed", SCORE: "score", RERANK: "rerank"}


def pooling_kind(url: str) -> str | None:
    """``"embed"``, ``"score"`` or ``"rerank"`` for a pooling endpoint (``/score``, ``/v1/score``, ``/rerank``,
    ``/v1/rerank``, ``/v2/rerank`` as ``run_batch`` spells them); None for a generation endpoint."""
    return _POOLING_KINDS.get(canonical_url(url, VLLM_ENDPOINTS) or url)

#: OpenAI body keys -> vLLM ``SamplingParams`` names. Keys absent here and in ``_IGNORED`` pass through
#: unchanged when ``SamplingParams`` knows them (top_k, min_p, repetition_penalty, min_tokens, ...).
_RENAMED = {"max_completion_tokens": "max_tokens"}
#: Body keys that are not sampling parameters (or that the runner handles itself).
_IGNORED = frozenset({
    "model", "messages", "prompt", "input", "stream", "stream_options", "user", "metadata", "store",
    "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "response_format", "service_tier",
    "logprobs", "top_logprobs", "encoding_format", "dimensions", "reasoning_effort", "modalities",
})


def emit(event: str, **fields: Any) -> None:
    """Write one progress event as a JSON line on stdout (the operator relays it to the task log)."""
    sys.stdout.write(json.dumps({EVENT_KEY: event, **fields}, default=str) + "\n")
    sys.stdout.flush()


@dataclass
class RunnerConfig:
    """What one run does; read from the ``--config`` JSON file.

    :param input: local path of the request JSONL.
    :param output: local path of the output JSONL (appended to; it is the resume state).
    :param model: a path or model id the node can load.
    :param llm_kwargs: keyword arguments for ``vllm.LLM`` (dtype, tensor_parallel_size, max_model_len...).
    :param sampling: default sampling parameters (vLLM names); each request's body overrides them.
    :param chunk_size: requests in the engine at once (embeddings: per engine call), and the most answers
        held in memory before they are written and synced.
    :param served_model_name: the ``model`` written in response bodies (kept for old configurations; the
        first of ``served_model_names`` wins).
    :param served_model_names: the names a line's ``model`` may use for this engine (as vLLM's
        ``--served-model-name``); the first is written in response bodies. Default: ``llm_kwargs``'
        ``served_model_name``, else ``[model]``.
    :param tool_call_parser: vLLM's tool parser for ``message.tool_calls`` (``run_batch --tool-call-parser``).
    :param enable_auto_tool_choice: parse tool calls for ``tool_choice: "auto"`` (``--enable-auto-tool-choice``).
    :param reasoning_parser: vLLM's reasoning parser for ``message.reasoning`` (``--reasoning-parser``).
    :param flush_interval: the most seconds a finished answer waits before it is written and synced.
    :param checks: output checks as :meth:`~airflow_provider_synth.batch.checks.OutputChecks.to_spec` writes
        them (a pydantic model as its JSON schema); with ``retry_failed_requests`` > 0 and ``retry`` set,
        unusable answers are asked again inside the engine.
    :param retry_failed_requests: the most times one request is asked again for an unusable answer (0: the
        checks are left to the merge, which reports unusable answers).
    """

    input: str
    output: str
    model: str
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    chunk_size: int = 1024
    served_model_name: str | None = None
    served_model_names: list[str] | None = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None
    flush_interval: float = 1.0
    checks: dict[str, Any] | None = None
    retry_failed_requests: int = 0

    @classmethod
    def from_file(cls, path: str) -> RunnerConfig:
        with open(path, "rb") as fp:
            data = loads(fp.read())
        return cls(**data)

    def served_names(self) -> list[str]:
        """The model names this engine answers to; the first is the one written in response bodies. Without
        ``served_model_names``, vLLM's own ``served_model_name`` engine argument counts."""
        if self.served_model_names:
            return list(self.served_model_names)
        engine_names = self.llm_kwargs.get("served_model_name")
        if engine_names:
            return [engine_names] if isinstance(engine_names, str) else list(engine_names)
        return [self.served_model_name or self.model]


@dataclass
class Request:
    """One pending request line.

    :param original: the input's body, when ``body`` carries a retry's changes.
    """

    custom_id: str
    url: str
    body: dict[str, Any]
    original: dict[str, Any] | None = None


class Rechecks:
    """Output checks inside the engine loop: which answers are asked again, and with what body.

    An answer the checks judge unusable is kept in the output (it was paid for) and its request asked again,
    alone, with the checks' ``retry_body`` for its kind applied to the input's body (as the OpenAI operator's
    retry rounds do), until the id has had ``rounds`` retries. The state is rebuilt from the output file on a
    resume, so a killed run goes on where it stopped.

    :param checker: the compiled checks.
    :param rounds: the most retries of one request.
    """

    def __init__(self, checker: Checker, rounds: int) -> None:
        self.checker = checker
        self.rounds = rounds
        #: unusable answers so far, per id that had one
        self.spent: dict[str, int] = {}
        #: ids to ask again -> the kind of their latest unusable answer
        self.pending: dict[str, str] = {}

    @classmethod
    def of(cls, cfg: RunnerConfig) -> Rechecks | None:
        """The run's rechecks, or ``None`` when it retries nothing (no checks, ``retry`` off, no rounds)."""
        checks = OutputChecks.from_spec(cfg.checks)
        if checks is None or not checks.retry or cfg.retry_failed_requests < 1:
            return None
        checker = checks.checker()
        return cls(checker, cfg.retry_failed_requests) if checker is not None else None

    def judge(self, custom_id: str, line: bytes) -> str | None:
        """Judge a success line (without its newline): the kind of unusable answer to ask again for, or
        ``None`` when the id is finished (a usable answer, or its retries spent)."""
        verdict = self.checker.judge(line)
        if not isinstance(verdict, Unusable):
            self.pending.pop(custom_id, None)
            return None
        spent = self.spent[custom_id] = self.spent.get(custom_id, 0) + 1
        if spent > self.rounds:
            self.pending.pop(custom_id, None)
            return None
        self.pending[custom_id] = verdict.kind
        return verdict.kind

    def again(self, req: Request) -> Request:
        """``req`` as it is asked again: the input's body with the retry changes for its latest kind."""
        base = req.original if req.original is not None else req.body
        kind = self.pending.get(req.custom_id)
        changes = self.checker.retry_body(kind) if kind is not None else None
        return Request(req.custom_id, req.url, changed_body(base, changes) if changes else base, base)


# --------------------------------------------------------------------------------------------------- resume


def recover_output(path: str, rechecks: Rechecks | None = None) -> set[str]:
    """Read an existing output file; return the custom_ids it answers for good.

    Answers are appended by whole lines in one ``write`` per flush, so a kill can only tear the tail. The file
    is cut back to the end of its last complete, parseable line, so the next append starts on a fresh line and
    no request is answered twice. A success or a failure a retry cannot fix (a 400) is final; a failure a retry
    can fix (the engine aborted the request, a 5xx) is run again, and the merge keeps its latest answer. With
    ``rechecks``, a success the checks refuse is final only once its id spent its retries (``rechecks`` is
    brought up to date with every line read).
    """
    done: set[str] = set()
    if not os.path.exists(path):
        return done
    good_end = 0
    with open(path, "r+b") as fp:
        for raw in fp:
            if not raw.endswith(b"\n"):
                break
            try:
                out = parse_output_line(raw[:-1])
            except ValueError:
                break
            if out.ok and (rechecks is None or rechecks.judge(out.custom_id, out.raw) is None):
                done.add(out.custom_id)
            elif not out.ok and not out.retryable:
                done.add(out.custom_id)
            good_end += len(raw)
        size = fp.seek(0, os.SEEK_END)
        if size != good_end:
            fp.truncate(good_end)
            emit("truncated", path=path, dropped_bytes=size - good_end)
    return done


def count_requests(path: str, done: set[str]) -> tuple[int, int]:
    """(total requests, requests already answered) of the input, in one streaming pass."""
    total = answered = 0
    with open(path, "rb") as fp:
        for _, raw in iter_jsonl(fp):
            total += 1
            if done and _peek_id(raw) in done:
                answered += 1
    return total, answered


def _peek_id(raw: bytes) -> str | None:
    try:
        cid = loads(raw).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return cid if isinstance(cid, str) else None


def iter_requests(path: str, done: set[str], rechecks: Rechecks | None = None) -> Iterator[Request]:
    """Stream the requests not yet answered, in input order; one whose latest answer was unusable comes with
    its retry body (see :class:`Rechecks`)."""
    with open(path, "rb") as fp:
        for lineno, raw in iter_jsonl(fp):
            try:
                line = loads(raw)
                url = line.get("url", CHAT)  # every spelling of an endpoint (/chat/completions, /v2/rerank...)
                req = Request(line["custom_id"], canonical_url(url, VLLM_ENDPOINTS) or url, line.get("body") or {})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # the operator validates before starting; a standalone run reports and goes on
                emit("invalid_line", line=lineno, reason=f"{type(exc).__name__}: {exc}")
                continue
            if req.custom_id in done:
                continue
            yield rechecks.again(req) if rechecks is not None and req.custom_id in rechecks.pending else req


def iter_chunks(path: str, done: set[str], chunk_size: int) -> Iterator[list[Request]]:
    """Stream the requests not yet answered, ``chunk_size`` at a time, in input order."""
    chunk: list[Request] = []
    for req in iter_requests(path, done):
        chunk.append(req)
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------------------- request mapping


def sampling_kwargs(body: dict[str, Any], defaults: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """Sampling parameters for one request: the defaults, overridden by the OpenAI body's values."""
    # without max_tokens a request may generate up to the context length, as in the OpenAI API
    kwargs: dict[str, Any] = {"max_tokens": None} if "max_tokens" in known else {}
    kwargs.update(defaults)
    for key, value in body.items():
        if key in _IGNORED or value is None:
            continue
        name = _RENAMED.get(key, key)
        if name in known:
            kwargs[name] = value
    if body.get("logit_bias") and "logit_bias" in known:
        kwargs["logit_bias"] = {int(k): float(v) for k, v in body["logit_bias"].items()}
    return kwargs


def structured_outputs_kwargs(body: dict[str, Any]) -> dict[str, Any] | None:
    """``StructuredOutputsParams`` kwargs for an OpenAI ``response_format``, or None for plain text."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"json_object": True}
    if fmt["type"] == "json_schema":
        return {"json": (fmt.get("json_schema") or {}).get("schema", {})}
    raise ValueError(f"unsupported response_format type {fmt['type']!r}")


def completion_prompt(value: Any) -> Any:
    """The one prompt of a ``/v1/completions`` body: a string or token ids (a list of one of those too)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return {"prompt_token_ids": value}
    raise ValueError("body.prompt must be one string or one list of token ids")


def embedding_prompts(value: Any) -> list[Any]:
    """The prompts of one embeddings request: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [{"prompt_token_ids": value}]
    if isinstance(value, list) and value:
        return [v if isinstance(v, str) else {"prompt_token_ids": list(v)} for v in value]
    raise ValueError("body.input must be a string, a list of strings, or token ids")


def _encode_embedding(values: Sequence[float], encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return list(values)


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


# ----------------------------------------------------------------------------------------------------- codecs


class Codec(Protocol):
    """Maps one request onto the engine, and the engine's finished output back onto a response body."""

    def enqueue(self, req: Request) -> tuple[list[str], Any]:
        """Add ``req`` to the engine; return the engine's request ids and what :meth:`body` needs of it.
        Raises when the request is refused (its line becomes an error line)."""
        ...

    def body(self, req: Request, state: Any, out: Any, rid: str) -> dict[str, Any]:
        """The response body for a finished ``RequestOutput``."""
        ...


class PlainCodec:
    """OpenAI body keys mapped by name onto sampling parameters; bodies built here. Serves
    ``/v1/completions`` (``run_batch`` does not), and chat where vLLM's OpenAI protocol is not at hand.

    :param llm: the engine (``enqueue_chat``/``enqueue``, as ``vllm.LLM``).
    :param cfg: the run's configuration.
    :param make_sampling: builds ``SamplingParams`` from keyword arguments and structured-output kwargs.
    :param known_sampling: the names ``SamplingParams`` accepts.
    """

    def __init__(self, llm: Any, cfg: RunnerConfig, make_sampling: Callable[..., Any],
                 known_sampling: frozenset[str]) -> None:
        self.llm = llm
        self.cfg = cfg
        self.make_sampling = make_sampling
        self.known_sampling = known_sampling
        self.model_name = cfg.served_names()[0]

    def enqueue(self, req: Request) -> tuple[list[str], Any]:
        kwargs = sampling_kwargs(req.body, self.cfg.sampling, self.known_sampling)
        params = self.make_sampling(kwargs, structured_outputs_kwargs(req.body))
        if req.url == COMPLETIONS:
            return list(self.llm.enqueue(completion_prompt(req.body.get("prompt")), params, use_tqdm=False)), None
        ids = self.llm.enqueue_chat(req.body["messages"], params, use_tqdm=False, tools=req.body.get("tools"),
                                    chat_template_kwargs=req.body.get("chat_template_kwargs"))
        return list(ids), None

    def body(self, req: Request, state: Any, out: Any, rid: str) -> dict[str, Any]:
        prompt = len(out.prompt_token_ids or ())
        completion = sum(len(c.token_ids) for c in out.outputs)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens or 0}}
        if req.url == COMPLETIONS:
            choices = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for c in out.outputs]
            return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": usage}
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish_reason} for c in out.outputs]
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": usage}


# ------------------------------------------------------------------------------------------------ processor


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
            data = [{"object": "embedding", "index": i, "embedding": _encode_embedding(o.outputs.embedding, fmt)}
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


# --------------------------------------------------------------------------------------------------- output


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


# ----------------------------------------------------------------------------------------------------- engine


def engine_kwargs(cfg: RunnerConfig, url: str, *, on_cpu: bool = False) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments; an embeddings, score or rerank run asks for a pooling runner (embeddings:
    converting the model to an embedder) unless told otherwise. On a CPU (``on_cpu``), the default dtype
    (``"auto"``) becomes the one this CPU runs natively (:func:`cpu_dtype`), and an event says which and why."""
    kwargs = dict(cfg.llm_kwargs)
    if on_cpu and kwargs.get("dtype", "auto") == "auto":
        kwargs["dtype"], why = cpu_dtype()
        emit("dtype", dtype=kwargs["dtype"], message=f"dtype 'auto' on a CPU node runs as {kwargs['dtype']}: {why}")
    kind = pooling_kind(url)
    if kind:
        kwargs.setdefault("runner", "pooling")
    if kind == "embed":
        kwargs.setdefault("convert", "embed")
    return kwargs


def first_url(path: str, done: set[str]) -> str:
    """The endpoint of the first pending request (one batch file serves one endpoint)."""
    for req in iter_requests(path, done):
        return req.url
    return CHAT


def load_processor(cfg: RunnerConfig, url: str) -> Processor:
    """Import vLLM and load the model; raise ``SystemExit`` with a clear event when either fails."""
    try:
        import vllm
        from vllm import LLM
    except ImportError as exc:
        emit("error", kind="vllm_missing", message=f"vLLM is not importable in {sys.executable}: {exc}. "
             "Point the operator's `python` at an interpreter with vLLM (scripts/install_vllm.sh builds one).")
        raise SystemExit(EXIT_NO_VLLM) from None
    if cfg.model.startswith(("/", "./", "~")) and not os.path.exists(os.path.expanduser(cfg.model)):
        emit("error", kind="model_load", message=f"model path {cfg.model!r} does not exist on this node")
        raise SystemExit(EXIT_MODEL_LOAD)
    from vllm.platforms import current_platform

    kwargs = engine_kwargs(cfg, url, on_cpu=current_platform.is_cpu())
    started = time.monotonic()
    try:
        llm = LLM(model=cfg.model, **kwargs)
    except Exception as exc:
        emit("error", kind="model_load", message=f"vLLM could not load model {cfg.model!r}: "
             f"{type(exc).__name__}: {exc}")
        raise SystemExit(EXIT_MODEL_LOAD) from None
    emit("loaded", model=cfg.model, vllm_version=vllm.__version__, load_s=round(time.monotonic() - started, 2),
         runner=kwargs.get("runner", "generate"))
    return processor_for(llm, cfg, url)


def processor_for(llm: Any, cfg: RunnerConfig, url: str = CHAT) -> Processor:
    """A :class:`Processor` over an already loaded ``vllm.LLM``: chat through vLLM's OpenAI protocol (as
    ``run_batch``), completions through :class:`PlainCodec`; ``url`` is the run's endpoint."""
    from vllm import PoolingParams, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from airflow_provider_synth.runs.vllm_chat import OpenAIChatCodec

    def make_sampling(kwargs: dict[str, Any], structured: dict[str, Any] | None) -> Any:
        if structured is not None:
            kwargs = {**kwargs, "structured_outputs": StructuredOutputsParams(**structured)}
        return SamplingParams(**kwargs)

    known = frozenset(getattr(SamplingParams, "__struct_fields__", ()))
    plain = PlainCodec(llm, cfg, make_sampling, known)
    codec: Codec = plain if pooling_kind(url) else OpenAIChatCodec(llm, cfg, plain)
    return Processor(llm, cfg, codec, PoolingParams, url)


def run(cfg: RunnerConfig, processor_factory: Callable[[RunnerConfig, str], Processor] = load_processor, *,
        keep_engine: bool = False) -> int:
    """Answer every request of ``cfg.input`` not yet in ``cfg.output``; return the process exit code. The engine
    is shut down after a complete run unless ``keep_engine`` (for a caller that reuses it)."""
    rechecks = Rechecks.of(cfg)
    done = recover_output(cfg.output, rechecks)
    total, answered = count_requests(cfg.input, done)
    emit("start", total=total, already_done=answered, pending=total - answered,
         **({"unusable_to_retry": len(rechecks.pending)} if rechecks is not None else {}))
    if answered >= total:
        emit("done", total=total, done=answered, failed=0, elapsed_s=0.0)
        return 0
    url = first_url(cfg.input, done)
    processor = processor_factory(cfg, url)
    processor.rechecks = rechecks
    tally = processor.tally
    started = time.monotonic()

    def progress(event: str = "progress") -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        emit(event, done=answered + tally.done, total=total, failed=tally.failed, retried=tally.retried,
             prompt_tokens=tally.prompt_tokens, completion_tokens=tally.completion_tokens,
             elapsed_s=round(elapsed, 2), requests_per_s=round(tally.done / elapsed, 2),
             tokens_per_s=round((tally.prompt_tokens + tally.completion_tokens) / elapsed, 1))

    with open(cfg.output, "ab") as out:
        writer = OutputWriter(out, cfg.chunk_size, cfg.flush_interval)
        try:
            if pooling_kind(url):
                pool_all(processor, iter_chunks(cfg.input, done, cfg.chunk_size), writer, progress)
            else:
                pipeline(processor, iter_requests(cfg.input, done, rechecks), writer, cfg.chunk_size, progress)
        except Exception as exc:
            if writer.flush():  # the answers the engine gave before it failed are good answers
                progress()
            emit("error", kind="engine", message=f"the engine failed: {type(exc).__name__}: {exc}")
            return EXIT_ENGINE
    progress("done")
    if not keep_engine:
        shutdown_engine(processor.llm)
    return 0


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


def shutdown_engine(llm: Any, timeout: float = 10.0) -> None:
    """Stop vLLM's engine-core processes while this process is still whole. Left to the interpreter's exit,
    vLLM's teardown can abort the process (SIGABRT, "terminate called without an active exception") after every
    answer is already on disk; :func:`main`'s caller then leaves with ``os._exit``, skipping that teardown."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    stop = getattr(client, "shutdown", None)
    if stop is None:
        return
    try:
        stop(timeout=timeout)
    except Exception as exc:  # the answers are written: a failed teardown must not fail the run
        emit("warning", message=f"the engine did not shut down cleanly: {type(exc).__name__}: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_provider_synth.runs.vllm_runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="path of the run's JSON configuration")
    args = parser.parse_args(argv)
    try:
        cfg = RunnerConfig.from_file(args.config)
    except (OSError, ValueError, TypeError) as exc:
        emit("error", kind="config", message=f"bad runner configuration {args.config}: {exc}")
        return EXIT_BAD_CONFIG
    if not os.path.exists(cfg.input):
        emit("error", kind="config", message=f"input file {cfg.input} does not exist")
        return EXIT_BAD_CONFIG
    try:
        guard_engine(cfg.output, emit)  # dies with the task; one engine per output file
        return run(cfg)
    except SystemExit as exc:
        return int(exc.code or 0)


def _exit(code: int) -> None:
    """Leave without the interpreter's teardown (see :func:`shutdown_engine`): output is fsynced per chunk and
    the event stream is flushed here, so nothing is lost by skipping it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # vLLM starts engine processes with spawn: this guard is required
    _exit(main())
