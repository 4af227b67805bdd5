"""A stand-in for vLLM's ``LLM`` so that DAGs using :class:`VLLMBatchOperator` run without vLLM or a GPU.

It answers through the real runner (:mod:`airflow_provider_synth.engine.vllm`): the engine loop, resume,
error lines and progress events are the real ones; only the engine is fake (and answers chat with the
runner's plain codec, not vLLM's OpenAI protocol). Point the operator's ``python`` at an
executable that runs ``python -m airflow_provider_synth.testing.vllm "$@"`` (see :func:`write_fake_python`).

The fake engine: a prompt token is a whitespace-separated word; the answer is ``"echo: <the words>"`` cut to
``max_tokens`` words (``finish_reason: "length"`` when cut, so a larger ``max_tokens`` completes it), generated
one word per engine step for up to 16 requests at once (short answers finish first). A prompt
``JSON <a> <b> ...`` answers the word ``<a>`` the first time this engine is asked it, ``<b>`` the second time,
and its last word after that: JSON that fits a schema only when asked again (``JSON {"n":"x"} {"n":1}``), or
never (``JSON {"n":"x"}``). A message containing ``RAISE`` is refused when it is added (as vLLM refuses an over-long prompt);
``DIE`` kills the engine. ``SYNTH_FAKE_VLLM_DELAY`` (seconds) slows each engine step;
``SYNTH_FAKE_VLLM_DIE_AFTER`` (a count) kills the engine after that many answers;
``SYNTH_FAKE_VLLM_ABORT_AT_EXIT=1`` aborts the process (SIGABRT) after the run, as vLLM's teardown sometimes does;
``SYNTH_FAKE_VLLM_ASKED`` (a file) appends one line per generation request added to the engine (``enqueue_chat``,
``enqueue``), refused ones included: its prompt's words, space-separated. It counts what the engine was asked
across engine processes and tries (an answer lost in a crash was still asked), as a service's record of what it
was sent does for the contract test (tests/contract/test_backend_contract.py).
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_synth.engine.vllm.codecs import PlainCodec
from airflow_provider_synth.engine.vllm.config import RunnerConfig, emit
from airflow_provider_synth.engine.vllm.loop import Processor
from airflow_provider_synth.engine.vllm.process import guard_engine
from airflow_provider_synth.engine.vllm.runner import run


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
    stop_reason: Any = None
    logprobs: Any = None


@dataclass
class _RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[_Completion]
    num_cached_tokens: int = 0
    finished: bool = True


@dataclass
class _Embedding:
    embedding: list[float]


@dataclass
class _EmbeddingOutput:
    prompt_token_ids: list[int]
    outputs: _Embedding
    error: Any = None


@dataclass
class _Sequence:
    """One request in the fake engine: its answer is generated one word per step."""

    request_id: str
    prompt: list[str]
    params: FakeSamplingParams
    generated: int = 0
    #: how many times the engine was asked this prompt before
    asked: int = 0

    @property
    def full(self) -> list[str]:
        """The whole answer, before ``max_tokens`` cuts it."""
        if self.prompt[:1] == ["JSON"] and len(self.prompt) > 1:
            return [self.prompt[1:][min(self.asked, len(self.prompt) - 2)]]
        return ["echo:", *self.prompt]

    @property
    def reply(self) -> list[str]:
        limit = self.params.max_tokens if self.params.max_tokens is not None else 16
        return self.full[:limit]


@dataclass
class _Score:
    score: float


@dataclass
class _ScoreOutput:
    prompt_token_ids: list[int]
    outputs: _Score
    error: Any = None


def _words(messages: Sequence[dict[str, Any]]) -> list[str]:
    return " ".join(str(m.get("content", "")) for m in messages).split()


class FakeEngine:
    """Stands for vLLM's ``LLMEngine``: each :meth:`step` admits waiting requests up to ``max_num_seqs``, then
    generates one word of every running answer; an answer is returned in the step that finishes it, so short
    answers overtake long ones, as in vLLM's continuous batching.

    :param llm: the :class:`FakeLLM` it belongs to (its ``delay`` and ``die_after``).
    :param max_num_seqs: requests decoded together.
    """

    def __init__(self, llm: FakeLLM, max_num_seqs: int) -> None:
        self.llm = llm
        self.max_num_seqs = max_num_seqs
        self.waiting: list[_Sequence] = []
        self.running: list[_Sequence] = []
        self.answered = 0
        #: (requests in the engine, answers given so far) at the start of each step
        self.in_flight_at_step: list[tuple[int, int]] = []

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def step(self) -> list[_RequestOutput]:
        llm = self.llm
        if llm.die_after is not None and self.answered >= llm.die_after:
            raise EngineDeadError("the engine core died")
        if llm.delay:
            time.sleep(llm.delay)
        self.in_flight_at_step.append((self.get_num_unfinished_requests(), self.answered))
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        finished: list[_Sequence] = []
        for seq in self.running:
            if "DIE" in seq.prompt:
                raise EngineDeadError("the engine core died")
            seq.generated += 1
            if seq.generated >= len(seq.reply):
                finished.append(seq)
        if llm.die_after is not None:
            finished = finished[:llm.die_after - self.answered]
        self.answered += len(finished)
        self.running = [s for s in self.running if s not in finished]
        return [self._output(s) for s in finished]

    @staticmethod
    def _output(seq: _Sequence) -> _RequestOutput:
        reply = seq.reply
        finish = "length" if len(seq.full) > len(reply) else "stop"
        outs = [_Completion(i, " ".join(reply), list(range(len(reply))), finish) for i in range(seq.params.n)]
        return _RequestOutput(seq.request_id, list(range(len(seq.prompt))), outs)


class FakeLLM:
    """Implements the part of ``vllm.LLM`` the runner calls: ``enqueue_chat``, ``enqueue``, ``llm_engine``
    and ``embed``. A request is checked when it is added (``RAISE`` and over-long prompts are refused there,
    as vLLM's input processor refuses them); ``DIE`` kills the engine when it runs.

    :param delay: seconds each engine step (and each ``embed`` call) sleeps (to kill a run mid-way in tests).
    :param max_model_len: prompts longer than this (in words) are refused, like vLLM's context check.
    :param die_after: the engine dies after giving this many answers.
    :param max_num_seqs: requests the engine decodes together.
    :param asked_log: a file to append each added generation request's prompt to (one line per request).
    """

    def __init__(self, delay: float = 0.0, max_model_len: int = 256, die_after: int | None = None,
                 max_num_seqs: int = 16, asked_log: str | None = None) -> None:
        self.delay = delay
        self.max_model_len = max_model_len
        self.die_after = die_after
        self.asked_log = asked_log
        self.llm_engine = FakeEngine(self, max_num_seqs)
        self.calls: list[int] = []
        self._counter = 0
        #: prompts asked so far, with how often
        self.asked: Counter[tuple[str, ...]] = Counter()

    def _add(self, words: list[str], params: FakeSamplingParams) -> list[str]:
        if self.asked_log:  # before any refusal: a refused request was asked too
            with open(self.asked_log, "a", encoding="utf-8") as fp:
                fp.write(" ".join(words) + "\n")
        if "RAISE" in words:
            raise FakeValidationError("refused by the engine")
        if len(words) > self.max_model_len:
            raise FakeValidationError(f"The decoder prompt (length {len(words)}) is longer than the maximum "
                                      f"model length of {self.max_model_len}.", "input_tokens")
        rid = str(self._counter)
        self._counter += 1
        self.llm_engine.waiting.append(_Sequence(rid, words, params, asked=self.asked[tuple(words)]))
        self.asked[tuple(words)] += 1
        return [f"{rid}-{os.urandom(4).hex()}"]  # vLLM returns its internal id, outputs carry the given one

    def enqueue_chat(self, messages: Sequence[dict[str, Any]], sampling_params: FakeSamplingParams,
                     use_tqdm: bool = False, **_: Any) -> list[str]:
        return self._add(_words(messages), sampling_params)

    def enqueue(self, prompt: Any, sampling_params: FakeSamplingParams, use_tqdm: bool = False,
                **_: Any) -> list[str]:
        words = prompt.split() if isinstance(prompt, str) else [str(t) for t in prompt["prompt_token_ids"]]
        return self._add(words, sampling_params)

    def embed(self, prompts: Sequence[Any], pooling_params: Sequence[FakePooling] | None = None,
              use_tqdm: bool = False, **_: Any) -> list[_EmbeddingOutput]:
        words = [p.split() if isinstance(p, str) else [str(t) for t in p["prompt_token_ids"]] for p in prompts]
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise EngineDeadError("the engine core died")
        self.calls.append(len(words))
        if self.delay:
            time.sleep(self.delay)
        for w in words:
            if "DIE" in w:
                raise EngineDeadError("the engine core died")
            if "RAISE" in w:
                raise FakeValidationError("refused by the engine")
        pooling: Sequence[FakePooling | None] = pooling_params or [None] * len(words)
        dims = [(p.dimensions if p is not None else None) or 4 for p in pooling]
        return [_EmbeddingOutput(list(range(len(w))), _Embedding([float(len(w)) + i / 10 for i in range(d)]))
                for w, d in zip(words, dims, strict=True)]

    def score(self, queries: Sequence[str], documents: Sequence[str], use_tqdm: bool = False,
              **_: Any) -> list[_ScoreOutput]:
        """A cross-encoder over N -> N pairs (``LLM.score``)."""
        self.calls.append(len(documents))
        if any("RAISE" in d.split() for d in documents):
            raise FakeValidationError("refused by the engine")
        return [_ScoreOutput(list(range(len(q.split()) + len(d.split()))), _Score(_overlap(q, d)))
                for q, d in zip(queries, documents, strict=True)]


def _overlap(query: str, document: str) -> float:
    """The fake cross-encoder's score: the share of the query's words found in the document."""
    words = query.split()
    return sum(w in document.split() for w in words) / max(len(words), 1)


def fake_processor(cfg: RunnerConfig, url: str, llm: FakeLLM | None = None) -> Processor:
    """A runner :class:`~airflow_provider_synth.engine.vllm.loop.Processor` over a :class:`FakeLLM`."""
    if llm is None:
        die_after = os.environ.get("SYNTH_FAKE_VLLM_DIE_AFTER")
        llm = FakeLLM(delay=float(os.environ.get("SYNTH_FAKE_VLLM_DELAY", "0")),
                      max_model_len=int(cfg.llm_kwargs.get("max_model_len") or 256),
                      die_after=int(die_after) if die_after else None,
                      asked_log=os.environ.get("SYNTH_FAKE_VLLM_ASKED") or None)
    emit("loaded", model=cfg.model, vllm_version="fake", load_s=0.0)
    codec = PlainCodec(llm, cfg, make_sampling, KNOWN_SAMPLING)
    return Processor(llm, cfg, codec, FakePooling, url)


def write_fake_python(path: str | os.PathLike[str]) -> str:
    """Write an executable that stands for a vLLM interpreter: ``python -m <anything> --config X`` runs the
    real runner with the fake engine. Returns its path, for the operator's ``python``."""
    script = Path(path)
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m airflow_provider_synth.testing.vllm "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(script)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["-m"]:  # called as the vLLM interpreter: drop "-m airflow_provider_synth.engine.vllm"
        args = args[2:]
    cfg = RunnerConfig.from_file(args[args.index("--config") + 1])
    try:
        guard_engine(cfg.output, emit)
    except SystemExit as exc:
        return int(exc.code or 0)
    code = run(cfg, fake_processor)
    if os.environ.get("SYNTH_FAKE_VLLM_ABORT_AT_EXIT") == "1":
        sys.stdout.flush()
        os.abort()
    return code


if __name__ == "__main__":
    sys.exit(main())
