"""Merge the outputs of many shards and retry rounds into ``results.jsonl`` and ``failures.jsonl``.

Shards are contiguous slices of the input, so each is merged on its own: memory is bounded by one shard
(the service caps a shard at 50,000 requests), whatever the size of the whole run. Within a shard, output
lines are matched by custom_id, never by position; results come out in input order.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, is_, not_
from typing import IO, Any, NamedTuple

import msgspec

from airflow_provider_synth.batch import jsonl
from airflow_provider_synth.batch.checks import UNUSABLE_KINDS, Checker, OutputChecks, Unusable, retry_line
from airflow_provider_synth.batch.errors import AccountingError
from airflow_provider_synth.batch.jsonl import dumps, iter_block_bytes, iter_jsonl, loads
from airflow_provider_synth.batch.paths import open_path
from airflow_provider_synth.batch.results import (
    UNREADABLE_CODE,
    ParsedOutput,
    _out_decoder,
    bulk_success,
    classify,
    is_ok,
    parse_output_line,
    success_raw_and_usage,
)
from airflow_provider_synth.batch.usage import Usage

log = logging.getLogger(__name__)

#: How many unknown/duplicate ids (and unreadable lines) the accounting keeps as examples.
MAX_EXAMPLES = 20
#: the custom_id of a line that is not JSON any more (cut off, or garbled after its start)
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"((?:[^"\\]|\\.)*)"')

Source = Any  # a path, URL, path object, or a callable returning a binary file object


class _Id(msgspec.Struct, gc=False):
    custom_id: str


_id_decoder = msgspec.json.Decoder(_Id)
_get_id = attrgetter("custom_id")


@dataclass(frozen=True)
class BadLine:
    """A line of a service's output or error file that could not be read: where, why, and its custom_id when
    that much of it survived."""

    file: str
    line: int
    error: str
    custom_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "error": self.error, "custom_id": self.custom_id}


class Unreadable(NamedTuple):
    """The failure entry of an id whose answer is in a line that could not be read (retryable: a new round asks
    for it again)."""

    custom_id: str
    bad: BadLine | None


def _bad_line(name: str, lineno: int, raw: bytes, exc: Exception) -> BadLine:
    found = _CUSTOM_ID.search(raw[:4096])
    cid = None
    if found:
        try:
            cid = jsonl.loads(b'"' + found.group(1) + b'"')
        except ValueError:
            cid = None
    return BadLine(name, lineno, f"{exc}: {raw[:120]!r}", cid)


@contextmanager
def _opened(src: Source) -> Iterator[IO[bytes]]:
    fp = src() if callable(src) else open_path(src, "rb")
    try:
        yield fp
    finally:
        fp.close()


@dataclass
class ShardOutputs:
    """One shard's request file and every output/error file that answered it, in round order.

    :param requests: the shard's request JSONL.
    :param outputs: output and error files of round 0, then of each retry round.
    :param rounds: the round of each output file (default: its position); read by the output checks' count of
        the rounds spent on unusable answers. A file holding several rounds (vLLM's engine output, where a
        request asked again is appended) puts a line in the round after the id's last unusable answer.
    """

    requests: Source
    outputs: Sequence[Source] = ()
    rounds: Sequence[int] = ()


@dataclass
class Accounting:
    """Counts of a merge; ``succeeded + failed + missing == total`` always (see :meth:`check`)."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    missing: int = 0
    retryable: int = 0
    duplicates: int = 0
    unknown: int = 0
    unknown_examples: list[str] = field(default_factory=list)
    duplicate_examples: list[str] = field(default_factory=list)
    #: lines of the service's files that could not be read, and the first ``MAX_EXAMPLES`` of them (file, line)
    unreadable: int = 0
    unreadable_lines: list[BadLine] = field(default_factory=list)
    error_codes: Counter[str] = field(default_factory=Counter)
    usage: Usage = field(default_factory=Usage)
    results_written: int = 0
    failures_written: int = 0
    #: with output checks: unusable answers by kind over every round, what they burned, how many were retried
    checked: bool = False
    unusable: Counter[str] = field(default_factory=Counter)
    unusable_usage: Usage = field(default_factory=Usage)
    unusable_retried: int = 0
    check_rounds: set[int] = field(default_factory=set)
    invalid: int = 0
    synthetic_ids: int = 0

    def check(self) -> None:
        """Enforce the accounting invariant: every input custom_id is in results or failures exactly once."""
        if self.succeeded + self.failed + self.missing != self.total:
            raise AccountingError(f"accounting broken: succeeded {self.succeeded} + failed {self.failed} + "
                                  f"missing {self.missing} != total {self.total}")
        if self.results_written != self.succeeded or self.failures_written != self.failed + self.missing:
            raise AccountingError(f"accounting broken: wrote {self.results_written} results and "
                                  f"{self.failures_written} failures for {self.succeeded} succeeded, "
                                  f"{self.failed} failed and {self.missing} missing")

    def as_dict(self) -> dict[str, Any]:
        data = {
            "total": self.total, "succeeded": self.succeeded, "failed": self.failed, "missing": self.missing,
            "retryable": self.retryable, "duplicates": self.duplicates, "unknown": self.unknown,
            "unknown_examples": self.unknown_examples, "duplicate_examples": self.duplicate_examples,
            "error_codes": dict(self.error_codes), "usage": self.usage.as_dict(),
            "invalid": self.invalid, "synthetic_ids": self.synthetic_ids, "unreadable": self.unreadable,
        }
        if self.unreadable:
            data["unreadable_lines"] = [b.as_dict() for b in self.unreadable_lines]
        if self.checked:
            data["checks"] = self.checks_dict()
        return data

    def checks_dict(self) -> dict[str, Any]:
        """What the output checks found: unusable answers per kind over every round (``truncated``,
        ``refused``, ``schema_invalid``...), how many a retry answered again, the retry rounds that carried them,
        and the tokens they burned (billed, but not data)."""
        counts: dict[str, Any] = dict.fromkeys(UNUSABLE_KINDS, 0)
        counts.update(self.unusable)
        return {**counts, "unusable": sum(self.unusable.values()), "retried": self.unusable_retried,
                "rounds": len(self.check_rounds), "usage": self.unusable_usage.as_dict()}


def request_custom_id(raw: bytes) -> str:
    """The custom_id of a request line. Lines built by this package start with it, so most are read
    without decoding the body."""
    if raw.startswith(b'{"custom_id":"'):
        end = raw.find(b'"', 14)
        if end > 14 and raw.find(b"\\", 14, end) < 0:
            return raw[14:end].decode()
    return _id_decoder.decode(raw).custom_id


def _decoded(src: Source, bad: list[BadLine]) -> tuple[list[Any], list[bytes]]:
    """The decoded output lines of an output or error file and, in parallel, the raw lines (two lists, no
    per-line tuple: millions of small allocations are what slows a merge down). A line that is not an output
    line (an HTML error page, a line cut off) is appended to ``bad`` and skipped: the others are paid for."""
    outs: list[Any] = []
    raws: list[bytes] = []
    start = 1
    with _opened(src) as fp:
        for data in iter_block_bytes(fp, jsonl.BLOCK_BYTES):
            lines = data.split(b"\n")
            try:
                decoded: list[Any] | None = _out_decoder.decode_lines(data)
            except msgspec.DecodeError:
                decoded = None
            # a blank line, or two objects on one line, breaks the pairing: go line by line
            if decoded is not None and len(decoded) == len(lines) and b"\r" not in data:
                outs.extend(decoded)
                raws.extend(lines)
                start += len(lines)
                continue
            for offset, raw in enumerate(lines):
                raw = raw.rstrip(b"\r")
                if not raw or raw.isspace():
                    continue
                try:
                    outs.append(_out_decoder.decode(raw))
                except msgspec.DecodeError as exc:
                    name = str(getattr(fp, "name", src)) if callable(src) else str(src)
                    bad.append(_bad_line(name, start + offset, raw, exc))
                    continue
                raws.append(raw)
            start += len(lines)
    return outs, raws


@dataclass
class _Answers:
    """What came back for a shard, over every round: the raw success lines, the latest failures, attempt
    counts of ids answered more than once, and the usage of the successes."""

    succeeded: dict[str, bytes] = field(default_factory=dict)
    failed: dict[str, tuple[Any, bytes]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    usage: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    #: output checks (``None``: every 200 is a success); what they found goes in the fields below
    checker: Checker | None = None
    unusable: Counter[str] = field(default_factory=Counter)
    unusable_usage: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    unusable_retried: int = 0
    retry_rounds: set[int] = field(default_factory=set)
    #: unusable answers per id so far: an answer that replaces the n-th one is of retry round n at least
    unusable_seen: Counter[str] = field(default_factory=Counter)
    #: lines that could not be read, over every file
    bad_lines: list[BadLine] = field(default_factory=list)

    def add_bad(self, bad: Sequence[BadLine]) -> None:
        """Unreadable lines of one file: an id they name that has no success becomes an ``output_unreadable``
        failure (a later round's answer replaces it)."""
        self.bad_lines.extend(bad)
        for line in bad:
            if line.custom_id is not None and line.custom_id not in self.succeeded:
                self.failed[line.custom_id] = (Unreadable(line.custom_id, line), b"")

    @property
    def anonymous_bad(self) -> int:
        """Unreadable lines whose custom_id could not be read."""
        return sum(b.custom_id is None for b in self.bad_lines)

    def add_one(self, out: Any, raw: bytes, acct: Accounting | None, rnd: int = 0) -> None:
        """One answer: a success is never replaced; a later answer replaces an earlier failure."""
        cid = out.custom_id
        seen = cid in self.succeeded or cid in self.failed
        if seen:
            self.attempts[cid] = self.attempts.get(cid, 1) + 1
        if cid in self.succeeded:
            if is_ok(out) and acct is not None:
                acct.duplicates += 1
                if len(acct.duplicate_examples) < MAX_EXAMPLES:
                    acct.duplicate_examples.append(cid)
            return
        if seen and isinstance(self.failed[cid][0], Unusable):
            self.unusable_retried += 1
            self.retry_rounds.add(max(rnd, self.unusable_seen[cid]))
        if is_ok(out):
            line, counts = success_raw_and_usage(out, raw)
            if self.checker is not None:
                verdict = self.checker.judge(line, counts)
                if isinstance(verdict, Unusable):
                    self._unusable(verdict, line)
                    return
                line = verdict if verdict is not None else line
            self.failed.pop(cid, None)
            self.succeeded[cid] = line
            if counts is not None:
                self.usage.append(counts)
        else:
            self.failed[cid] = (out, raw)

    def _unusable(self, verdict: Unusable, line: bytes) -> None:
        """A billed answer the checks refused: a failure (a later round may replace it), its tokens counted."""
        self.unusable[verdict.kind] += 1
        self.unusable_seen[verdict.custom_id] += 1
        if verdict.usage is not None:
            self.unusable_usage.append(verdict.usage)
        self.failed[verdict.custom_id] = (verdict, line)

    def _judge_all(self, outs: list[Any], raws: list[bytes], oks: list[bool]) -> bool:
        """With checks, on a source whose ids are all new: judge every success in place (an unusable one
        becomes a failure, a usable one gets its ``parsed`` line). ``False`` (nothing changed) for old vLLM
        lines, which the per-line path normalizes first."""
        assert self.checker is not None
        judge = self.checker.judge
        if any(out.response.status_code is None for out, ok in zip(outs, oks, strict=True) if ok):
            return False
        for i in [i for i, ok in enumerate(oks) if ok]:
            verdict = judge(raws[i])
            if isinstance(verdict, Unusable):
                verdict = verdict._replace(usage=success_raw_and_usage(outs[i], raws[i])[1])
                self._unusable(verdict, raws[i])
                oks[i] = False
                outs[i] = verdict  # so the failures below record the same entry
            elif verdict is not None:
                raws[i] = verdict
        return True

    def add_source(self, outs: list[Any], raws: list[bytes], acct: Accounting | None, rnd: int = 0) -> None:
        """Every answer of one output or error file. The common case (no id seen twice) is handled a column
        at a time in decode order, which is also memory order."""
        oks = list(map(is_ok, outs))
        ids = list(map(_get_id, outs))
        fresh = set(ids)
        if len(fresh) != len(ids) or not fresh.isdisjoint(self.succeeded) or not fresh.isdisjoint(self.failed) or (
                self.checker is not None and not self._judge_all(outs, raws, oks)):
            for out, raw in zip(outs, raws, strict=True):
                self.add_one(out, raw, acct, rnd)
            return
        if not all(oks):
            bad = list(map(not_, oks))
            self.failed.update(zip(compress(ids, bad), zip(compress(outs, bad), compress(raws, bad), strict=True),
                                   strict=True))
            outs, raws, ids = list(compress(outs, oks)), list(compress(raws, oks)), list(compress(ids, oks))
        won_raws, counts = bulk_success(outs, raws)
        self.succeeded.update(zip(ids, won_raws, strict=True))
        self.usage.extend(counts)


def _index_outputs(outputs: Sequence[Source], acct: Accounting | None, checker: Checker | None = None,
                   rounds: Sequence[int] = ()) -> _Answers:
    """Every answer for a shard over all rounds (see :class:`_Answers`)."""
    answers = _Answers(checker=checker)
    for i, src in enumerate(outputs):
        bad: list[BadLine] = []
        answers.add_source(*_decoded(src, bad), acct, rounds[i] if i < len(rounds) else i)
        answers.add_bad(bad)
    return answers


def _compiled(checks: OutputChecks | Checker | None) -> Checker | None:
    return checks.checker() if isinstance(checks, OutputChecks) else checks


def _entry_output(entry: tuple[Any, bytes]) -> ParsedOutput:
    """The last failure of an id, classified (an unusable answer is a failure with its kind as the code)."""
    first, raw = entry
    if isinstance(first, Unreadable):
        where = f" ({first.bad.file}:{first.bad.line})" if first.bad is not None else ""
        return ParsedOutput(first.custom_id, False, None, UNREADABLE_CODE,
                            f"the service's answer for this request could not be read{where}; a retry round asks "
                            "for it again", True, None, raw)
    if isinstance(first, Unusable):
        return ParsedOutput(first.custom_id, False, 200, first.kind, first.message, first.retryable, first.usage,
                            raw)
    return classify(first, raw)


def _request_ids(src: Source) -> list[str]:
    """The custom_ids of a request file, in order, decoded a block at a time (blank lines skipped)."""
    ids: list[str] = []
    with _opened(src) as fp:
        for data in iter_block_bytes(fp, jsonl.BLOCK_BYTES):
            try:
                ids.extend(map(_get_id, _id_decoder.decode_lines(data)))
            except msgspec.DecodeError:
                for raw in data.split(b"\n"):
                    raw = raw.rstrip(b"\r")
                    if raw and not raw.isspace():
                        ids.append(request_custom_id(raw))
    return ids


def _failure_row(cid: str, out: ParsedOutput | None, attempts: int, entry: tuple[Any, bytes] | None = None
                 ) -> dict[str, Any]:
    if out is None:
        return {"custom_id": cid, "error": {"code": "missing", "message": "no output or error line came back "
                "for this request"}, "status_code": None, "retryable": True, "attempts": 0}
    row = {"custom_id": cid, "error": {"code": out.error_code, "message": out.error_message},
           "status_code": out.status_code, "retryable": out.retryable, "attempts": attempts}
    if entry is not None and isinstance(entry[0], Unusable):  # billed but unusable: keep what the model said
        row["text"] = entry[0].text
        row["response"] = loads(entry[1]).get("response")
    return row


def merge_shard(shard: ShardOutputs, results_fp: IO[bytes], failures_fp: IO[bytes],
                acct: Accounting | None = None, checks: OutputChecks | Checker | None = None) -> Accounting:
    """Merge one shard into the open results and failures files, in the shard's input order.

    :param checks: output checks: unusable answers go to failures (with their text), never to results.
    """
    acct = acct if acct is not None else Accounting()
    checker = _compiled(checks)
    answers = _index_outputs(shard.outputs, acct, checker, shard.rounds)
    ids = _request_ids(shard.requests)
    # per-request work stays in C (map/filter/compress): this loop runs once per request of the whole run
    lines = list(map(answers.succeeded.pop, ids, repeat(None)))
    raws = list(filter(None, lines))  # success lines are never empty
    for k in range(0, len(raws), 200):  # one write per many lines (~100 KB: reused memory, not fresh pages)
        results_fp.write(b"\n".join(raws[k:k + 200]) + b"\n")
    unanswered = compress(ids, map(is_, lines, repeat(None))) if len(raws) < len(ids) else ()
    anonymous = answers.anonymous_bad
    for cid in unanswered:
        entry = answers.failed.pop(cid, None)
        if entry is None and anonymous:  # its answer may be one of the lines that could not be read
            entry = (Unreadable(cid, None), b"")
        parsed = _entry_output(entry) if entry is not None else None
        if parsed is None:
            acct.missing += 1
            acct.error_codes["missing"] += 1
        else:
            acct.failed += 1
            acct.error_codes[parsed.error_code or "unknown_error"] += 1
        row = _failure_row(cid, parsed, answers.attempts.get(cid, 1), entry)
        acct.retryable += bool(row["retryable"])
        failures_fp.write(dumps(row) + b"\n")
        acct.failures_written += 1
    # answers for ids this shard never asked: reported, never hidden, and their usage is not this run's
    strays = [parse_output_line(line).usage for line in answers.succeeded.values()]
    usage = Usage()
    usage.add_many(answers.usage, len(raws))
    usage.add_many([tuple(-n for n in c) for c in strays if c is not None], 0)  # type: ignore[misc]
    for cid in [*answers.succeeded, *answers.failed]:
        acct.unknown += 1
        if len(acct.unknown_examples) < MAX_EXAMPLES:
            acct.unknown_examples.append(cid)
    acct.usage.add(usage)
    if checker is not None:
        _add_checks(acct, answers)
    acct.unreadable += len(answers.bad_lines)
    acct.unreadable_lines.extend(answers.bad_lines[: max(MAX_EXAMPLES - len(acct.unreadable_lines), 0)])
    acct.total += len(ids)
    acct.succeeded += len(raws)
    acct.results_written += len(raws)
    return acct


def add_invalid(rows: Source, failures_fp: IO[bytes], acct: Accounting) -> Accounting:
    """Count the invalid lines a run set aside (``invalid_requests="skip"``: one failure row each, see
    :class:`~airflow_provider_synth.batch.validate.Rejected`) as failed requests, and copy their rows into
    ``failures.jsonl``."""
    with _opened(rows) as fp:
        for _, raw in iter_jsonl(fp):
            row = jsonl.loads(raw)
            failures_fp.write(raw + b"\n")
            acct.total += 1
            acct.failed += 1
            acct.invalid += 1
            acct.synthetic_ids += bool(row.get("synthetic_id"))
            acct.failures_written += 1
            acct.error_codes[row["error"]["code"]] += 1
    return acct


def _add_checks(acct: Accounting, answers: _Answers) -> None:
    acct.checked = True
    acct.unusable.update(answers.unusable)
    acct.unusable_usage.add_many(answers.unusable_usage, sum(answers.unusable.values()))
    acct.unusable_retried += answers.unusable_retried
    acct.check_rounds |= answers.retry_rounds


def merge_shards(shards: Sequence[ShardOutputs], results_fp: IO[bytes], failures_fp: IO[bytes],
                 checks: OutputChecks | Checker | None = None, invalid: Source | None = None) -> Accounting:
    """Merge every shard, in order, into ``results.jsonl`` and ``failures.jsonl`` (open binary files).

    :param checks: output checks (:class:`~airflow_provider_synth.batch.checks.OutputChecks`): answers they
        judge unusable go to ``failures.jsonl`` with their reason and text. ``None``: every 200 is a result.
    :param invalid: the failure rows of the lines set aside as invalid (``invalid_requests="skip"``); they
        count as failed requests and go to the end of ``failures.jsonl``.
    :returns: the accounting, already checked.
    :raises AccountingError: if the invariant does not hold.
    """
    acct = Accounting()
    checker = _compiled(checks)
    for shard in shards:
        merge_shard(shard, results_fp, failures_fp, acct, checker)
    if checker is not None:
        acct.checked = True
    if invalid is not None:
        add_invalid(invalid, failures_fp, acct)
    acct.check()
    if acct.unreadable:
        where = ", ".join(f"{b.file}:{b.line}" for b in acct.unreadable_lines[:5])
        log.warning("%d line(s) of the service's output could not be read (%s%s); the readable answers landed, "
                    "and the %d request(s) left without an answer are failures with code %r, retried by the "
                    "retry rounds", acct.unreadable, where, ", ..." if acct.unreadable > 5 else "",
                    acct.error_codes.get(UNREADABLE_CODE, 0), UNREADABLE_CODE)
    return acct


def pending_requests(requests: Source, outputs: Sequence[Source], out_fp: IO[bytes], *,
                     retryable_only: bool = True, include_missing: bool = True,
                     keep: Callable[[ParsedOutput], bool] | None = None,
                     checks: OutputChecks | Checker | None = None) -> int:
    """Write the requests of a shard that still need a round: no success yet, and (by default) a failure a
    retry can fix, or no answer at all. Finished work is never resubmitted. Returns how many were written.

    :param requests: the shard's request JSONL.
    :param outputs: every output and error file of the shard so far.
    :param out_fp: where the retry round's request lines go (copied byte for byte).
    :param retryable_only: skip failures a retry cannot fix (4xx validation errors, cancelled requests).
    :param include_missing: include requests with no answer at all.
    :param keep: an extra predicate on the last failure.
    :param checks: output checks: an unusable answer is a failure (retryable when the checks retry), and is
        written with the checks' ``retry_body`` changes for its kind.
    """
    checker = _compiled(checks)
    answers = _index_outputs(outputs, None, checker)
    written = 0
    with _opened(requests) as fp:
        for _, raw in iter_jsonl(fp):
            cid = request_custom_id(raw)
            entry = answers.failed.get(cid)
            if cid in answers.succeeded:
                wanted = False
            elif entry is None:
                wanted = include_missing
            else:
                out = _entry_output(entry)
                wanted = (out.retryable or not retryable_only) and (keep is None or keep(out))
                if wanted and checker is not None and isinstance(entry[0], Unusable):
                    changes = checker.retry_body(entry[0].kind)
                    raw = retry_line(raw, changes) if changes else raw
            if wanted:
                out_fp.write(raw)
                out_fp.write(b"\n")
                written += 1
    return written
