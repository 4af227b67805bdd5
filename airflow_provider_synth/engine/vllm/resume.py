"""Resume: what an existing output file already answers (a torn tail cut off), which requests are still
to run, and the output checks that ask an unusable answer again (:class:`Rechecks`, rebuilt from the output).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from airflow_provider_synth.batch.checks import Checker, OutputChecks, Unusable, changed_body
from airflow_provider_synth.batch.jsonl import iter_jsonl, loads
from airflow_provider_synth.batch.requests import CHAT, VLLM_ENDPOINTS, canonical_url
from airflow_provider_synth.batch.results import parse_output_line
from airflow_provider_synth.engine.vllm.config import Request, RunnerConfig, emit


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


def first_url(path: str, done: set[str]) -> str:
    """The endpoint of the first pending request (one batch file serves one endpoint)."""
    for req in iter_requests(path, done):
        return req.url
    return CHAT
