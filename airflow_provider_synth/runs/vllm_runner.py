"""The engine side of :class:`~airflow_provider_synth.operators.vllm.VLLMBatchOperator`.

It runs in the vLLM interpreter, not in Airflow's (vLLM cannot share Airflow's environment), and imports only
vLLM, the standard library and this provider's core (``airflow_provider_synth.batch``)::

    python -m airflow_provider_synth.runs.vllm_runner --config run.json

``run.json`` holds ``input`` and ``output`` (local paths), ``model``, ``llm_kwargs`` (for ``vllm.LLM``),
``sampling`` (default sampling parameters, in vLLM's names; each request's body overrides them) and
``chunk_size``. The runner streams the input in chunks through ``LLM.chat`` (``/v1/chat/completions``),
``LLM.generate`` (``/v1/completions``) or ``LLM.embed`` (``/v1/embeddings``) and appends one OpenAI-format
output line per request to ``output``, flushed and synced after every chunk.

* A request the engine refuses (an over-long prompt, a bad sampling value) becomes an error line; the run
  goes on.
* Resume: on start the runner reads ``output``, cuts a torn last line (a kill mid-write), and skips every
  custom_id already answered for good (a success, or a failure a retry cannot fix), so a rerun finishes the
  rest and never answers a finished request twice.
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
from typing import Any

from airflow_provider_synth.batch.jsonl import dumps, iter_jsonl, loads
from airflow_provider_synth.batch.requests import CHAT, COMPLETIONS, EMBEDDINGS
from airflow_provider_synth.batch.results import error_line, parse_output_line, success_line
from airflow_provider_synth.runs.vllm_process import guard_engine

EVENT_KEY = "synth_vllm"
EXIT_BAD_CONFIG = 2
EXIT_NO_VLLM = 3
EXIT_MODEL_LOAD = 4
EXIT_ENGINE = 5


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
    :param chunk_size: requests per engine call, and per flush of the output.
    :param served_model_name: the ``model`` written in response bodies (default: ``model``).
    """

    input: str
    output: str
    model: str
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    chunk_size: int = 1024
    served_model_name: str | None = None
    served_model_names: list[str] | None = None

    @classmethod
    def from_file(cls, path: str) -> RunnerConfig:
        with open(path, "rb") as fp:
            data = loads(fp.read())
        return cls(**data)


@dataclass
class Request:
    """One pending request line."""

    custom_id: str
    url: str
    body: dict[str, Any]


# --------------------------------------------------------------------------------------------------- resume


def recover_output(path: str) -> set[str]:
    """Read an existing output file; return the custom_ids it answers for good.

    Lines are appended one chunk per ``write``, so a kill can only tear the tail. The file is cut back to
    the end of its last complete, parseable line, so the next append starts on a fresh line and no request
    is answered twice. A success or a failure a retry cannot fix (a 400) is final; a failure a retry can fix
    (the engine aborted the request, a 5xx) is run again, and the merge keeps its latest answer.
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
            if out.ok or not out.retryable:
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


def iter_chunks(path: str, done: set[str], chunk_size: int) -> Iterator[list[Request]]:
    """Stream the requests not yet answered, ``chunk_size`` at a time, in input order."""
    chunk: list[Request] = []
    with open(path, "rb") as fp:
        for lineno, raw in iter_jsonl(fp):
            try:
                line = loads(raw)
                url = line.get("url", CHAT)  # Azure's form (/chat/completions) names the same endpoint
                req = Request(line["custom_id"], url if url.startswith("/v1/") else "/v1" + url, line.get("body") or {})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # the operator validates before starting; a standalone run reports and goes on
                emit("invalid_line", line=lineno, reason=f"{type(exc).__name__}: {exc}")
                continue
            if req.custom_id in done:
                continue
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
    if getattr(exc, "parameter", None) == "input_tokens" or "maximum context length" in str(exc):
        return 400, "context_length_exceeded"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"VLLMClientError", "ValueError", "TypeError", "KeyError", "TemplateError"}:
        return 400, "invalid_request"
    return 500, "server_error"


def _engine_dead(exc: BaseException) -> bool:
    return any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__)


# ------------------------------------------------------------------------------------------------ processor


@dataclass
class Tally:
    """Running totals for progress events."""

    done: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Processor:
    """Turns chunks of requests into output lines with one engine. Engine-agnostic enough to unit test:
    ``llm`` needs ``chat``/``generate``/``embed``, ``make_sampling``/``make_pooling`` build parameter objects.

    :param llm: a ``vllm.LLM``.
    :param cfg: the run's configuration.
    :param make_sampling: builds ``SamplingParams`` from keyword arguments (raises on bad values).
    :param make_pooling: builds ``PoolingParams`` from keyword arguments.
    :param known_sampling: the names ``SamplingParams`` accepts.
    """

    def __init__(self, llm: Any, cfg: RunnerConfig, make_sampling: Callable[..., Any],
                 make_pooling: Callable[..., Any], known_sampling: frozenset[str]) -> None:
        self.llm = llm
        self.cfg = cfg
        self.make_sampling = make_sampling
        self.make_pooling = make_pooling
        self.known_sampling = known_sampling
        self.model_name = cfg.served_model_name or cfg.model
        self.tally = Tally()

    def process(self, chunk: list[Request]) -> list[bytes]:
        """Answer one chunk; return its output lines (newline-terminated) in the chunk's order."""
        lines: dict[str, bytes] = {}
        groups: dict[tuple[str, bytes], list[tuple[Request, Any]]] = {}
        for req in chunk:
            try:
                params = self._params(req)
            except Exception as exc:  # a bad value in one body must not stop the run
                lines[req.custom_id] = self._error(req, exc)
                continue
            key = (req.url, dumps([req.body.get("tools"), req.body.get("chat_template_kwargs")]))
            groups.setdefault(key, []).append((req, params))
        for (url, _), items in groups.items():
            for req, line in self._isolate(url, items):
                lines[req.custom_id] = line
        return [lines[req.custom_id] + b"\n" for req in chunk]

    def _params(self, req: Request) -> Any:
        if req.url == EMBEDDINGS:
            dims = req.body.get("dimensions")
            return self.make_pooling(dimensions=dims) if dims else None
        if req.url not in (CHAT, COMPLETIONS):
            raise ValueError(f"the vLLM runner does not serve {req.url!r}")
        kwargs = sampling_kwargs(req.body, self.cfg.sampling, self.known_sampling)
        structured = structured_outputs_kwargs(req.body)
        return self.make_sampling(kwargs, structured)

    def _isolate(self, url: str, items: list[tuple[Request, Any]]) -> list[tuple[Request, bytes]]:
        """Run ``items`` in one engine call; when the engine refuses the call, bisect to find the bad
        request(s), so one bad line costs an error line, not the run."""
        try:
            outputs = self._call(url, items)
        except Exception as exc:
            if _engine_dead(exc):
                raise
            if len(items) == 1:
                return [(items[0][0], self._error(items[0][0], exc))]
            mid = len(items) // 2
            return self._isolate(url, items[:mid]) + self._isolate(url, items[mid:])
        return [(req, self._line(url, req, out)) for (req, _), out in zip(items, outputs, strict=True)]

    def _call(self, url: str, items: list[tuple[Request, Any]]) -> list[Any]:
        if url == EMBEDDINGS:
            return self._embed(items)
        params = [p for _, p in items]
        if url == COMPLETIONS:
            return list(self.llm.generate([r.body["prompt"] for r, _ in items], params, use_tqdm=False))
        first = items[0][0].body
        return list(self.llm.chat([r.body["messages"] for r, _ in items], params, use_tqdm=False,
                                  tools=first.get("tools"), chat_template_kwargs=first.get("chat_template_kwargs")))

    def _embed(self, items: list[tuple[Request, Any]]) -> list[Any]:
        """One ``LLM.embed`` call for every input of every request; regrouped per request."""
        prompts: list[Any] = []
        pooling: list[Any] = []
        sizes: list[int] = []
        for req, params in items:
            these = embedding_prompts(req.body.get("input"))
            prompts.extend(these)
            pooling.extend([params if params is not None else self.make_pooling()] * len(these))
            sizes.append(len(these))
        outs = self.llm.embed(prompts, pooling_params=pooling, use_tqdm=False)
        grouped, start = [], 0
        for n in sizes:
            grouped.append(outs[start:start + n])
            start += n
        return grouped

    def _line(self, url: str, req: Request, out: Any) -> bytes:
        if url == EMBEDDINGS:
            return self._embedding_line(req, out)
        rid = f"vllm-{uuid.uuid4().hex}"
        bad = [c for c in out.outputs if c.finish_reason in ("abort", "error")]
        if bad or getattr(out, "error", None) is not None:
            self.tally.done += 1
            self.tally.failed += 1
            msg = str(getattr(out, "error", None) or f"generation ended with {bad[0].finish_reason!r}")
            return error_line(req.custom_id, "server_error", msg, status_code=500, request_id=rid)
        prompt = len(out.prompt_token_ids or ())
        completion = sum(len(c.token_ids) for c in out.outputs)
        self._count(prompt, completion)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens or 0}}
        if url == COMPLETIONS:
            choices = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for c in out.outputs]
            body = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": usage}
        else:
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": None, "finish_reason": c.finish_reason} for c in out.outputs]
            body = {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": usage}
        return success_line(req.custom_id, body, request_id=rid)

    def _embedding_line(self, req: Request, outs: list[Any]) -> bytes:
        rid = f"vllm-{uuid.uuid4().hex}"
        errors = [o.error for o in outs if getattr(o, "error", None) is not None]
        if errors:
            self.tally.done += 1
            self.tally.failed += 1
            return error_line(req.custom_id, "server_error", str(errors[0]), status_code=500, request_id=rid)
        fmt = req.body.get("encoding_format") or "float"
        data = [{"object": "embedding", "index": i, "embedding": _encode_embedding(o.outputs.embedding, fmt)}
                for i, o in enumerate(outs)]
        prompt = sum(len(o.prompt_token_ids or ()) for o in outs)
        self._count(prompt, 0)
        body = {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
        return success_line(req.custom_id, body, request_id=rid)

    def _error(self, req: Request, exc: BaseException) -> bytes:
        status, code = classify_error(exc)
        self.tally.done += 1
        self.tally.failed += 1
        return error_line(req.custom_id, code, f"{type(exc).__name__}: {exc}", status_code=status)

    def _count(self, prompt: int, completion: int) -> None:
        self.tally.done += 1
        self.tally.prompt_tokens += prompt
        self.tally.completion_tokens += completion


# ----------------------------------------------------------------------------------------------------- engine


def engine_kwargs(cfg: RunnerConfig, url: str) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments; an embeddings run asks for a pooling runner unless told otherwise."""
    kwargs = dict(cfg.llm_kwargs)
    if url == EMBEDDINGS:
        kwargs.setdefault("runner", "pooling")
        kwargs.setdefault("convert", "embed")
    return kwargs


def first_url(path: str, done: set[str]) -> str:
    """The endpoint of the first pending request (one batch file serves one endpoint)."""
    for chunk in iter_chunks(path, done, 1):
        return chunk[0].url
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
    kwargs = engine_kwargs(cfg, url)
    started = time.monotonic()
    try:
        llm = LLM(model=cfg.model, **kwargs)
    except Exception as exc:
        emit("error", kind="model_load", message=f"vLLM could not load model {cfg.model!r}: "
             f"{type(exc).__name__}: {exc}")
        raise SystemExit(EXIT_MODEL_LOAD) from None
    emit("loaded", model=cfg.model, vllm_version=vllm.__version__, load_s=round(time.monotonic() - started, 2),
         runner=kwargs.get("runner", "generate"))
    return processor_for(llm, cfg)


def processor_for(llm: Any, cfg: RunnerConfig) -> Processor:
    """A :class:`Processor` over an already loaded ``vllm.LLM``."""
    from vllm import PoolingParams, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    def make_sampling(kwargs: dict[str, Any], structured: dict[str, Any] | None) -> Any:
        if structured is not None:
            kwargs = {**kwargs, "structured_outputs": StructuredOutputsParams(**structured)}
        return SamplingParams(**kwargs)

    known = frozenset(getattr(SamplingParams, "__struct_fields__", ()))
    return Processor(llm, cfg, make_sampling, PoolingParams, known)


def run(cfg: RunnerConfig, processor_factory: Callable[[RunnerConfig, str], Processor] = load_processor) -> int:
    """Answer every request of ``cfg.input`` not yet in ``cfg.output``; return the process exit code."""
    done = recover_output(cfg.output)
    total, answered = count_requests(cfg.input, done)
    emit("start", total=total, already_done=answered, pending=total - answered)
    if answered >= total:
        emit("done", total=total, done=answered, failed=0, elapsed_s=0.0)
        return 0
    processor = processor_factory(cfg, first_url(cfg.input, done))
    tally = processor.tally
    started = time.monotonic()
    with open(cfg.output, "ab") as out:
        for chunk in iter_chunks(cfg.input, done, cfg.chunk_size):
            try:
                lines = processor.process(chunk)
            except Exception as exc:
                emit("error", kind="engine", message=f"the engine failed: {type(exc).__name__}: {exc}")
                return EXIT_ENGINE
            out.write(b"".join(lines))  # one write per chunk: a kill can only tear the file's tail
            out.flush()
            os.fsync(out.fileno())
            elapsed = max(time.monotonic() - started, 1e-9)
            emit("progress", done=answered + tally.done, total=total, failed=tally.failed,
                 prompt_tokens=tally.prompt_tokens, completion_tokens=tally.completion_tokens,
                 elapsed_s=round(elapsed, 2), requests_per_s=round(tally.done / elapsed, 2),
                 tokens_per_s=round((tally.prompt_tokens + tally.completion_tokens) / elapsed, 1))
    emit("done", total=total, done=answered + tally.done, failed=tally.failed,
         prompt_tokens=tally.prompt_tokens, completion_tokens=tally.completion_tokens,
         elapsed_s=round(time.monotonic() - started, 2))
    shutdown_engine(processor.llm)
    return 0


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
