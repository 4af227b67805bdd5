"""A stand-in for vLLM's ``LLM`` so that DAGs using :class:`VLLMBatchOperator` run without vLLM or a GPU.

It answers through the real runner (:mod:`airflow_provider_synth.runs.vllm_runner`): resume, chunking, error
lines and progress events are the real ones; only the engine is fake. Point the operator's ``python`` at an
executable that runs ``python -m airflow_provider_synth.testing.vllm "$@"`` (see :func:`write_fake_python`).

The fake engine: a prompt token is a whitespace-separated word; the answer is ``"echo: <last user words>"``
cut to ``max_tokens`` words; a message containing ``RAISE`` makes the engine refuse the whole call (as vLLM
does for an over-long prompt); ``DIE`` kills the engine. ``SYNTH_FAKE_VLLM_DELAY`` (seconds) slows each call;
``SYNTH_FAKE_VLLM_DIE_AFTER`` (a count) kills the engine after that many calls;
``SYNTH_FAKE_VLLM_ABORT_AT_EXIT=1`` aborts the process (SIGABRT) after the run, as vLLM's teardown sometimes does.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_synth.runs import vllm_runner
from airflow_provider_synth.runs.vllm_process import guard_engine


class EngineDeadError(RuntimeError):
    """Named like vLLM's: the runner stops the run on it instead of isolating a request."""


class FakeValidationError(ValueError):
    """Raised like ``vllm.exceptions.VLLMValidationError``."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass
class FakeSamplingParams:
    """Checks values like ``SamplingParams`` does (a negative temperature is refused)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    n: int = 1
    seed: int | None = None
    top_p: float = 1.0
    stop: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise FakeValidationError(f"temperature must be non-negative, got {self.temperature}", "temperature")
        if self.n < 1:
            raise FakeValidationError(f"n must be at least 1, got {self.n}", "n")


KNOWN_SAMPLING = frozenset({"max_tokens", "temperature", "n", "seed", "top_p", "stop"})


def make_sampling(kwargs: dict[str, Any], structured: dict[str, Any] | None) -> FakeSamplingParams:
    extra = {"structured_outputs": structured} if structured else {}
    return FakeSamplingParams(**kwargs, extra=extra)


@dataclass
class FakePooling:
    dimensions: int | None = None


@dataclass
class _Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class _RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[_Completion]
    num_cached_tokens: int = 0


@dataclass
class _Embedding:
    embedding: list[float]


@dataclass
class _EmbeddingOutput:
    prompt_token_ids: list[int]
    outputs: _Embedding
    error: Any = None


def _words(messages: Sequence[dict[str, Any]]) -> list[str]:
    return " ".join(str(m.get("content", "")) for m in messages).split()


class FakeLLM:
    """Implements the part of ``vllm.LLM`` the runner calls: ``chat``, ``generate`` and ``embed``.

    :param delay: seconds each call sleeps (to kill a run mid-way in tests).
    :param max_model_len: prompts longer than this (in words) are refused, like vLLM's context check.
    :param die_after: the engine dies on the call after this many calls.
    """

    def __init__(self, delay: float = 0.0, max_model_len: int = 256, die_after: int | None = None) -> None:
        self.delay = delay
        self.max_model_len = max_model_len
        self.die_after = die_after
        self.calls: list[int] = []

    def _check(self, prompts: list[list[str]]) -> None:
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise EngineDeadError("the engine core died")
        self.calls.append(len(prompts))
        if self.delay:
            time.sleep(self.delay)
        for words in prompts:
            if "DIE" in words:
                raise EngineDeadError("the engine core died")
            if "RAISE" in words:
                raise FakeValidationError("refused by the engine")
            if len(words) > self.max_model_len:
                raise FakeValidationError(f"This model's maximum context length is {self.max_model_len} tokens",
                                          "input_tokens")

    def chat(self, messages: Sequence[Sequence[dict[str, Any]]], sampling_params: Sequence[FakeSamplingParams],
             use_tqdm: bool = False, **_: Any) -> list[_RequestOutput]:
        prompts = [_words(m) for m in messages]
        self._check(prompts)
        return [self._answer(words, params) for words, params in zip(prompts, sampling_params, strict=True)]

    def generate(self, prompts: Sequence[str], sampling_params: Sequence[FakeSamplingParams],
                 use_tqdm: bool = False, **_: Any) -> list[_RequestOutput]:
        words = [p.split() for p in prompts]
        self._check(words)
        return [self._answer(w, params) for w, params in zip(words, sampling_params, strict=True)]

    def embed(self, prompts: Sequence[Any], pooling_params: Sequence[FakePooling] | None = None,
              use_tqdm: bool = False, **_: Any) -> list[_EmbeddingOutput]:
        words = [p.split() if isinstance(p, str) else [str(t) for t in p["prompt_token_ids"]] for p in prompts]
        self._check(words)
        pooling: Sequence[FakePooling | None] = pooling_params or [None] * len(words)
        dims = [(p.dimensions if p is not None else None) or 4 for p in pooling]
        return [_EmbeddingOutput(list(range(len(w))), _Embedding([float(len(w)) + i / 10 for i in range(d)]))
                for w, d in zip(words, dims, strict=True)]

    @staticmethod
    def _answer(words: list[str], params: FakeSamplingParams) -> _RequestOutput:
        limit = params.max_tokens if params.max_tokens is not None else 16
        reply = ["echo:", *words][:limit]
        finish = "length" if len(words) + 1 > limit else "stop"
        outs = [_Completion(i, " ".join(reply), list(range(len(reply))), finish) for i in range(params.n)]
        return _RequestOutput(list(range(len(words))), outs)


def fake_processor(cfg: vllm_runner.RunnerConfig, url: str, llm: FakeLLM | None = None) -> vllm_runner.Processor:
    """A runner :class:`~airflow_provider_synth.runs.vllm_runner.Processor` over a :class:`FakeLLM`."""
    if llm is None:
        die_after = os.environ.get("SYNTH_FAKE_VLLM_DIE_AFTER")
        llm = FakeLLM(delay=float(os.environ.get("SYNTH_FAKE_VLLM_DELAY", "0")),
                      max_model_len=int(cfg.llm_kwargs.get("max_model_len") or 256),
                      die_after=int(die_after) if die_after else None)
    vllm_runner.emit("loaded", model=cfg.model, vllm_version="fake", load_s=0.0)
    return vllm_runner.Processor(llm, cfg, make_sampling, FakePooling, KNOWN_SAMPLING)


def write_fake_python(path: str | os.PathLike[str]) -> str:
    """Write an executable that stands for a vLLM interpreter: ``python -m <anything> --config X`` runs the
    real runner with the fake engine. Returns its path, for the operator's ``python``."""
    script = Path(path)
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m airflow_provider_synth.testing.vllm "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(script)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["-m"]:  # called as the vLLM interpreter: drop "-m airflow_provider_synth.runs.vllm_runner"
        args = args[2:]
    cfg = vllm_runner.RunnerConfig.from_file(args[args.index("--config") + 1])
    try:
        guard_engine(cfg.output, vllm_runner.emit)
    except SystemExit as exc:
        return int(exc.code or 0)
    code = vllm_runner.run(cfg, fake_processor)
    if os.environ.get("SYNTH_FAKE_VLLM_ABORT_AT_EXIT") == "1":
        sys.stdout.flush()
        os.abort()
    return code


if __name__ == "__main__":
    sys.exit(main())
