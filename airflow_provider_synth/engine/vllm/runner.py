"""The engine side of :class:`~airflow_provider_synth.operators.vllm.VLLMBatchOperator`.

It runs in the vLLM interpreter, not in Airflow's (vLLM cannot share Airflow's environment), and imports only
vLLM, the standard library and this provider's core (``airflow_provider_synth.batch``)::

    python -m airflow_provider_synth.engine.vllm --config run.json

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
* Chat bodies are answered as vLLM's ``run_batch`` answers them (:mod:`~airflow_provider_synth.engine.vllm.chat`):
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
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from airflow_provider_synth.batch.requests import CHAT
from airflow_provider_synth.engine.vllm.codecs import Codec, PlainCodec
from airflow_provider_synth.engine.vllm.config import (
    EXIT_BAD_CONFIG,
    EXIT_ENGINE,
    EXIT_MODEL_LOAD,
    EXIT_NO_VLLM,
    RunnerConfig,
    emit,
    pooling_kind,
)
from airflow_provider_synth.engine.vllm.loop import OutputWriter, Processor, pipeline, pool_all
from airflow_provider_synth.engine.vllm.process import cpu_dtype, guard_engine
from airflow_provider_synth.engine.vllm.resume import (
    Rechecks,
    count_requests,
    first_url,
    iter_chunks,
    iter_requests,
    recover_output,
)


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

    from airflow_provider_synth.engine.vllm.chat import OpenAIChatCodec

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
    parser = argparse.ArgumentParser(prog="python -m airflow_provider_synth.engine.vllm", description=__doc__,
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
