"""Streaming validation of batch request lines.

Every problem in the input is collected (file, line number, custom_id, reason). What happens to an invalid
line is decided here, once, for every backend (``invalid_requests``): ``"fail"`` raises every problem at once,
as :class:`~airflow_provider_synth.batch.errors.InvalidRequestsError`, before anything is uploaded or paid for;
``"skip"`` sets each invalid line aside as one failure row (:class:`Rejected`) and lets the valid ones run.
Memory stays flat: lines are decoded one at a time into small msgspec structs (unknown fields are skipped
without being built), and duplicate detection keeps 8 bytes per request.
"""

from __future__ import annotations

import os
import re
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Annotated, Any, Literal, NamedTuple, TypeVar

import msgspec
import numpy as np

from airflow_provider_synth.batch import jsonl
from airflow_provider_synth.batch.errors import InvalidRequestsError, Problem
from airflow_provider_synth.batch.jsonl import dumps, iter_blocks
from airflow_provider_synth.batch.paths import open_path
from airflow_provider_synth.batch.requests import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    MODERATIONS,
    OPENAI_ENDPOINTS,
    RERANK,
    RESPONSES,
    SCORE,
    UNSUPPORTED_ENDPOINTS,
    VLLM_ENDPOINTS,
    canonical_url,
    scoring_pairs,
)

#: Default per-request size limit. The Batch API caps files (200 MB), not lines; one huge line is almost
#: always a mistake (an image inlined many times over), so it is refused early. Raise it if you mean it.
DEFAULT_MAX_LINE_BYTES = 10 * 1024 * 1024
#: How many problems are kept for the report (all are counted).
MAX_PROBLEMS_KEPT = 1000

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

#: What an operator does with invalid request lines: refuse the whole input, or run the valid lines only.
InvalidRequests = Literal["fail", "skip"]
INVALID_REQUESTS: tuple[InvalidRequests, ...] = ("fail", "skip")
#: The failure row's error code of an invalid line, and of a line naming a model the engine does not serve.
INVALID_CODE = "invalid_request"
MODEL_NOT_FOUND_CODE = "model_not_found"


def check_invalid_requests(value: str) -> InvalidRequests:
    """Validate an operator's ``invalid_requests`` argument."""
    if value not in INVALID_REQUESTS:
        raise ValueError(f"invalid_requests must be one of {INVALID_REQUESTS}, got {value!r}")
    return value


def synthetic_id(line: int) -> str:
    """The stable id reported for an invalid line without a readable (or unique) custom_id."""
    return f"line-{line}"


def skipped_summary(invalid: int, synthetic: int, where: Any) -> str:
    """One sentence for the task log about the lines ``invalid_requests="skip"`` set aside ('' if none)."""
    if not invalid:
        return ""
    text = f"{invalid} invalid request line(s) set aside, not sent; their reasons are in {where}"
    if synthetic:
        text += (f"; {synthetic} of them had no usable custom_id (unreadable or a duplicate) and are reported "
                 "as 'line-<n>' (n: the line number)")
    return text


class _NotServed(str):
    """A problem reason meaning "this model is not served here" (a 404 in a failure row, not a 400)."""

    __slots__ = ()


class Rejected:
    """Under ``invalid_requests="skip"``: writes one failure row per invalid line to ``fp``, in
    ``failures.jsonl``'s shape plus the line number. A line whose custom_id cannot be read (or is a duplicate of
    an earlier line's) is reported under :func:`synthetic_id` with ``"synthetic_id": true``, so that every input
    line is accounted for exactly once. The reasons of one line are joined into one row.

    :param fp: a writable binary file object.
    """

    def __init__(self, fp: IO[bytes]) -> None:
        self.fp = fp
        self.count = 0
        self.synthetic = 0
        self._line = 0
        self._cid: str | None = None
        self._taken: str | None = None
        self._reasons: list[str] = []
        self._not_found = False
        #: the line numbers set aside, in order
        self.lines: list[int] = []

    def add(self, line: int, custom_id: str | None, reason: str, *, id_taken: bool = False) -> None:
        if line != self._line:
            self.flush()
            self._line, self._cid, self._taken = line, custom_id or None, None
        if id_taken:
            self._cid, self._taken = None, custom_id
        self._reasons.append(reason)
        self._not_found = self._not_found or isinstance(reason, _NotServed)

    def flush(self) -> None:
        """Write the buffered line's row (call once more at the end)."""
        if not self._reasons:
            return
        cid, synthetic = self._cid, self._cid is None
        if cid is None:
            cid = synthetic_id(self._line)
            self.synthetic += 1
        status, code = (404, MODEL_NOT_FOUND_CODE) if self._not_found else (400, INVALID_CODE)
        message = f"line {self._line}: " + "; ".join(self._reasons)
        if synthetic:
            why = f"custom_id {self._taken!r} is taken" if self._taken else "no readable custom_id"
            message += f" ({why}: reported as {cid!r})"
        row: dict[str, Any] = {"custom_id": cid, "error": {"code": code, "message": message},
                               "status_code": status, "retryable": False, "attempts": 0, "line": self._line}
        if synthetic:
            row["synthetic_id"] = True
        self.fp.write(dumps(row) + b"\n")
        self.count += 1
        self.lines.append(self._line)
        self._reasons, self._not_found = [], False


class _Message(msgspec.Struct, gc=False):
    role: str


class _Body(msgspec.Struct, gc=False):
    model: str | None = None
    messages: list[_Message] | None = None
    input: msgspec.Raw = msgspec.Raw(b"null")
    prompt: msgspec.Raw = msgspec.Raw(b"null")
    stream: bool | None = None
    # score and rerank (vLLM): kept raw, decoded only for a line of those endpoints
    query: msgspec.Raw = msgspec.Raw(b"")
    documents: msgspec.Raw = msgspec.Raw(b"")
    text_1: msgspec.Raw = msgspec.Raw(b"")
    text_2: msgspec.Raw = msgspec.Raw(b"")
    data_1: msgspec.Raw = msgspec.Raw(b"")
    data_2: msgspec.Raw = msgspec.Raw(b"")
    queries: msgspec.Raw = msgspec.Raw(b"")
    items: msgspec.Raw = msgspec.Raw(b"")


class _Line(msgspec.Struct, gc=False):
    custom_id: str
    method: str
    url: str
    body: _Body


# The decoded structs hold only strings, numbers and Raw slices, never cycles: gc=False keeps millions of them
# out of the garbage collector, which otherwise runs constantly while a block decodes (2-3x slower).
_line_decoder = msgspec.json.Decoder(_Line)

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _ChatMessage(msgspec.Struct, gc=False):
    role: ChatRole


class _ChatBody(msgspec.Struct, gc=False):
    model: NonEmpty
    messages: Annotated[list[_ChatMessage], msgspec.Meta(min_length=1)]
    stream: Literal[False] | None = None


class _ChatLine(msgspec.Struct, gc=False):
    """A valid chat request line: the block decoder checks it all in C; any deviation sends the block to the
    line-by-line path, which reports each problem."""

    custom_id: NonEmpty
    method: Literal["POST"]
    url: Literal["/v1/chat/completions"]
    body: _ChatBody


_chat_block_decoder = msgspec.json.Decoder(_ChatLine)
_any_decoder = msgspec.json.Decoder()


class CheckedLine(NamedTuple):
    """What validation learned about one good line.

    ``url`` is the endpoint in OpenAI's ``/v1/...`` form; ``line_url`` is how the line spelled it (Azure's
    ``/chat/completions`` form is accepted too)."""

    custom_id: str
    url: str
    model: str | None
    embedding_inputs: int
    line_url: str | None = None


@dataclass
class ValidationSummary:
    """The outcome of a clean validation pass.

    :param total: number of requests.
    :param endpoint: the one endpoint every request uses.
    :param model: the one model every request uses (``None`` if a body omitted it).
    :param embedding_inputs: total embedding inputs (for ``/v1/embeddings``).
    """

    total: int = 0
    endpoint: str | None = None
    model: str | None = None
    embedding_inputs: int = 0


@dataclass
class LineChecker:
    """Check request lines one at a time; collect problems instead of stopping at the first.

    :param name: the file or source name used in problem reports.
    :param max_line_bytes: the per-request size limit.
    :param endpoint: the expected endpoint; by default the first line's endpoint is expected everywhere.
    :param endpoints: the endpoints the backend serves, canonical (default: the Batch APIs'); a line naming
        another is invalid.
    :param models: the models served (vLLM): a line naming another is invalid, and lines may name any of
        them. ``None`` (the Batch APIs): any model, but one per file.
    :param rejected: set: ``invalid_requests="skip"``, each invalid line goes there and the valid ones go on.
    :param known_duplicates: line number -> reason, for lines a first pass found to repeat a custom_id.
    """

    name: str = "<requests>"
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    endpoint: str | None = None
    endpoints: tuple[str, ...] = OPENAI_ENDPOINTS
    models: frozenset[str] | None = None
    rejected: Rejected | None = None
    known_duplicates: dict[int, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    file_problems: int = 0
    model: str | None = None
    _hashes: array = field(default_factory=lambda: array("q"))  # type: ignore[type-arg]
    _models_seen: bool = False

    @property
    def skipping(self) -> bool:
        """Under ``invalid_requests="skip"``: valid lines keep being written after a problem."""
        return self.rejected is not None

    def problem(self, line: int, custom_id: str | None, reason: str, *, id_taken: bool = False) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(Problem(self.name, line, custom_id, reason))
        if not line:
            self.file_problems += 1
        elif self.rejected is not None:
            self.rejected.add(line, custom_id, reason, id_taken=id_taken)

    def check(self, lineno: int, raw: bytes) -> CheckedLine | None:
        """Check one raw line; return what was learned, or ``None`` after recording the problem(s)."""
        if lineno in self.known_duplicates:
            self.problem(lineno, _peek_custom_id(raw), self.known_duplicates[lineno], id_taken=True)
            return None
        if len(raw) > self.max_line_bytes:
            self._unreadable(lineno, raw, f"line is {len(raw):,} bytes, over the per-request limit of "
                             f"{self.max_line_bytes:,}")
            return None
        try:
            line = _line_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            self._unreadable(lineno, raw, _decode_reason(exc))
            return None
        cid, body = line.custom_id, line.body
        self._hashes.append(hash(cid))
        # fast path: the common, valid line costs a handful of comparisons
        if (cid and line.method == "POST" and line.url == self.endpoint == CHAT and body.model == self.model
                and body.model and not body.stream and body.messages
                and all(m.role in CHAT_ROLES for m in body.messages)):
            return CheckedLine(cid, CHAT, body.model, 0, CHAT)
        reasons = self._line_problems(line)
        for reason in reasons:
            self.problem(lineno, cid, reason)
        if reasons:
            return None
        url = canonical_url(line.url, self.endpoints) or line.url
        inputs = _embedding_inputs(body) if url == EMBEDDINGS else 0
        return CheckedLine(cid, url, body.model, inputs, line.url)

    def _unreadable(self, lineno: int, raw: bytes, reason: str) -> None:
        """A line that cannot be decoded: its custom_id, when one can be found, still counts for duplicates
        (so that, under "skip", a torn line and a good one never both answer for the same id)."""
        cid = _peek_custom_id(raw)
        if cid:
            self._hashes.append(hash(cid))
        self.problem(lineno, cid, reason)

    def check_block(self, start: int, lines: list[bytes]) -> tuple[list[str], bytes] | None:
        """Check a block of chat lines at once (decoded and checked in C). Returns the custom_ids and the
        joined block when every line is valid, else ``None`` with nothing recorded: the caller re-checks the
        block line by line."""
        if (self.problem_count and not self.skipping) or not lines or self.endpoint not in (None, CHAT):
            return None
        if self.known_duplicates and any(start <= n < start + len(lines) for n in self.known_duplicates):
            return None
        buf = b"\n".join(lines)
        if b"\r" in buf or max(map(len, lines)) > self.max_line_bytes:
            return None
        try:
            decoded = _chat_block_decoder.decode_lines(buf)
        except msgspec.DecodeError:
            return None
        if len(decoded) != len(lines):  # blank lines: keep exact numbering on the slow path
            return None
        model = self.model if self._models_seen else decoded[0].body.model
        if any(line.body.model != model for line in decoded) or (self.models is not None
                                                                 and model not in self.models):
            return None
        ids = [line.custom_id for line in decoded]
        self._hashes.extend(map(hash, ids))
        self.endpoint, self.model, self._models_seen = CHAT, model, True
        return ids, buf

    def _line_problems(self, line: _Line) -> list[str]:
        reasons: list[str] = []
        if not line.custom_id:
            reasons.append("custom_id is empty")
        if line.method != "POST":
            reasons.append(f"method must be 'POST', got {line.method!r}")
        url = canonical_url(line.url, self.endpoints)
        if url is None:
            reasons.append(_unsupported_url(line.url, self.endpoints))
        elif self.endpoint is None:
            self.endpoint = url
        elif url != self.endpoint:
            reasons.append(f"url {line.url!r} differs from the batch's endpoint {self.endpoint!r}: "
                           "one batch serves one endpoint")
        reasons.extend(_body_problems(url or line.url, line.body))
        model = line.body.model
        if model is not None and self.models is not None and model not in self.models:
            served = ", ".join(sorted(self.models))
            reasons.append(_NotServed(f"model {model!r} is not served here (served: {served}); map other names "
                                      "onto the engine with served_model_names"))
        elif model is not None and not self._models_seen:
            self.model, self._models_seen = model, True
        elif model is not None and model != self.model and self.models is None:
            reasons.append(f"model {model!r} differs from the batch's model {self.model!r}: "
                           "one batch file serves one model")
        return reasons

    def duplicate_hashes(self) -> set[int]:
        """Hashes seen more than once (candidates: confirmed by comparing the ids themselves)."""
        if len(self._hashes) < 2:
            return set()
        arr = np.frombuffer(self._hashes, dtype=np.int64).copy()
        arr.sort()
        dup = arr[1:][arr[1:] == arr[:-1]]
        return set(dup.tolist())

    def check_duplicates(self, lines: Iterable[tuple[int, bytes]]) -> dict[int, str]:
        """Second pass, only when hashes collide: report every line whose custom_id was seen before; return
        them (line number -> reason)."""
        suspects = self.duplicate_hashes()
        found: dict[int, str] = {}
        if not suspects:
            return found
        first_seen: dict[str, int] = {}
        for lineno, raw in lines:
            cid = _peek_custom_id(raw)
            if cid is None or hash(cid) not in suspects:
                continue
            if cid in first_seen:
                found[lineno] = f"duplicate custom_id (first used on line {first_seen[cid]})"
                if self.rejected is None:
                    self.problem(lineno, cid, found[lineno])
            else:
                first_seen[cid] = lineno
        return found

    def raise_if_problems(self, total: int) -> None:
        """Raise every problem (``"fail"``); under ``"skip"`` only problems with the whole input, or an input
        with no valid line left."""
        if total == 0 and not self.problem_count:
            self.problem(0, None, "no requests: the input is empty")
        if self.rejected is not None:
            self.rejected.flush()
            if not self.file_problems and self.rejected.count < total:
                return
        if self.problem_count:
            problems = sorted(self.problems, key=lambda p: p.line)
            raise InvalidRequestsError(problems, self.problem_count)


def _decode_reason(exc: msgspec.DecodeError) -> str:
    msg = str(exc)
    if msg.startswith("Object missing required field"):
        return "missing required field " + msg.split("`")[1] if "`" in msg else msg
    if "malformed" in msg or "truncated" in msg or "trailing characters" in msg:
        return f"malformed JSON: {msg}"
    return msg


_CUSTOM_ID_RE = re.compile(rb'"custom_id"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _peek_custom_id(raw: bytes) -> str | None:
    """The custom_id of a line that failed to decode: parsed if possible, else found by pattern."""
    try:
        obj = _any_decoder.decode(raw)
    except msgspec.DecodeError:
        match = _CUSTOM_ID_RE.search(raw)
        return match.group(1).decode("utf-8", "replace") if match else None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


def _unsupported_url(url: str, served: tuple[str, ...]) -> str:
    """Why a line's ``url`` is refused, with where it is served if elsewhere."""
    unsupported = UNSUPPORTED_ENDPOINTS.get(url) or UNSUPPORTED_ENDPOINTS.get("/v1" + url)
    if unsupported:
        return f"unsupported url {url!r}: {unsupported}"
    if canonical_url(url, VLLM_ENDPOINTS):
        hint = " (VLLMBatchOperator serves it)"
    elif canonical_url(url, OPENAI_ENDPOINTS) == MODERATIONS:
        hint = " (only OpenAI's Batch API serves it: OpenAIBatchOperator on an OpenAI connection)"
    else:
        hint = ""
    return f"unsupported url {url!r}{hint}: this backend serves {', '.join(served)} (also spelled without /v1)"


def _raw_json(value: msgspec.Raw) -> Any:
    return _any_decoder.decode(value) if len(value) else None


def _body_problems(url: str, body: _Body) -> list[str]:
    reasons: list[str] = []
    if body.stream:
        reasons.append("body.stream is true: the Batch API does not stream")
    if not body.model:
        reasons.append("body.model is missing")
    check = _ENDPOINT_CHECKS.get(url)
    if check is not None:
        reasons.extend(check(url, body))
    return reasons


def _chat_problems(url: str, body: _Body) -> list[str]:
    if not body.messages:
        return ["body.messages is missing or empty"]
    bad = sorted({m.role for m in body.messages if m.role not in CHAT_ROLES})
    return [f"unknown message role(s) {bad}"] if bad else []


def _input_problems(url: str, body: _Body) -> list[str]:
    value = _raw_json(body.input)
    if value is None or value == "" or value == []:
        return ["body.input is missing or empty"]
    if url == EMBEDDINGS and not _is_embedding_input(value):
        return ["body.input must be a string, a list of strings, or token ids"]
    return []


def _moderation_problems(url: str, body: _Body) -> list[str]:
    """``input``: a text, a list of texts, or (omni-moderation models) a list of text and image_url parts."""
    value = _raw_json(body.input)
    if value is None or value == "" or value == []:
        return ["body.input is missing or empty"]
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        return ["body.input must be a string, a list of strings, or a list of text and image_url parts"]
    reasons = []
    for i, part in enumerate(value):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind == "image_url" and isinstance((part.get("image_url") or {}).get("url"), str):
            if not str(body.model or "").startswith("omni-moderation"):
                reasons.append(f"body.input[{i}] is an image: only omni-moderation models classify images")
            continue
        reasons.append(f"body.input[{i}] must be {{'type': 'text', 'text': ...}} or "
                       "{'type': 'image_url', 'image_url': {'url': ...}}")
    return reasons


def _prompt_problems(url: str, body: _Body) -> list[str]:
    return ["body.prompt is missing or empty"] if _raw_json(body.prompt) in (None, "", []) else []


_SCORING_FIELDS = ("query", "documents", "text_1", "text_2", "data_1", "data_2", "queries", "items")


def _scoring_problems(url: str, body: _Body) -> list[str]:
    fields = {name: _raw_json(raw) for name in _SCORING_FIELDS if len(raw := getattr(body, name))}
    try:
        scoring_pairs(url, fields)
    except ValueError as exc:
        return [f"body: {exc}"]
    return []


_ENDPOINT_CHECKS: dict[str, Callable[[str, _Body], list[str]]] = {
    CHAT: _chat_problems, EMBEDDINGS: _input_problems, RESPONSES: _input_problems, COMPLETIONS: _prompt_problems,
    MODERATIONS: _moderation_problems, SCORE: _scoring_problems, RERANK: _scoring_problems,
}


def _is_embedding_input(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    if isinstance(first, str):
        return all(isinstance(v, str) and v for v in value)
    if isinstance(first, int):
        return all(isinstance(v, int) for v in value)
    return all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value)


def _embedding_inputs(body: _Body) -> int:
    value = _raw_json(body.input)
    if value is None:
        return 0
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


class Source:
    """A request source that can be read again to locate duplicates: a path, a file object or dicts."""

    def __init__(self, source: Any, name: str | None) -> None:
        self.source = source
        self.is_path = isinstance(source, str | os.PathLike) or hasattr(source, "protocol")
        self.is_file = not self.is_path and hasattr(source, "read")
        default = str(source) if self.is_path else str(getattr(source, "name", "<stream>"))
        self.name = name or (default if (self.is_path or self.is_file) else "<requests>")
        self._passes = 0

    def rereadable(self) -> bool:
        if self.is_path or isinstance(self.source, list | tuple):
            return True
        return bool(self.is_file and getattr(self.source, "seekable", lambda: False)())

    def lines(self) -> Iterator[tuple[int, bytes]]:
        for start, block in self.blocks():
            for offset, raw in enumerate(block):
                line = raw.rstrip(b"\r")
                if line and not line.isspace():
                    yield start + offset, line

    def blocks(self) -> Iterator[tuple[int, list[bytes]]]:
        """Blocks of raw lines with the line number of the first (see :func:`iter_blocks`)."""
        self._passes += 1
        if self.is_path:
            with open_path(self.source, "rb") as fp:
                yield from iter_blocks(fp, jsonl.BLOCK_BYTES)
        elif self.is_file:
            if self._passes > 1:
                self.source.seek(0)
            yield from iter_blocks(self.source, jsonl.BLOCK_BYTES)
        else:
            block: list[bytes] = []
            start = 1
            for i, d in enumerate(self.source, start=1):
                block.append(dumps(d))
                if len(block) == 10_000:
                    yield start, block
                    block, start = [], i + 1
            if block:
                yield start, block


def validate_requests(
    source: Any, *, name: str | None = None, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    models: Iterable[str] | None = None, endpoints: Iterable[str] = OPENAI_ENDPOINTS,
) -> ValidationSummary:
    """Validate a JSONL file (path, URL, path object or binary file object) or an iterable of request dicts.

    :param source: the requests.
    :param name: the name used in problem reports (default: the path).
    :param max_line_bytes: the per-request size limit.
    :param models: the models served (see :class:`LineChecker`); default: any one model.
    :param endpoints: the endpoints served (see :class:`LineChecker`); default: the Batch APIs'.
    :raises InvalidRequestsError: listing every problem found.
    """
    src = Source(source, name)
    checker = LineChecker(name=src.name, max_line_bytes=max_line_bytes, endpoints=tuple(endpoints),
                          models=frozenset(models) if models is not None else None)
    summary = ValidationSummary()
    for lineno, raw in src.lines():
        summary.total += 1
        checked = checker.check(lineno, raw)
        if checked is not None:
            summary.embedding_inputs += checked.embedding_inputs
    locate_duplicates(checker, src)
    checker.raise_if_problems(summary.total)
    summary.endpoint, summary.model = checker.endpoint, checker.model
    return summary


def locate_duplicates(checker: LineChecker, src: Source) -> dict[int, str]:
    """When hashes collided, read the source again to report each duplicate line exactly; return them."""
    if not checker.duplicate_hashes():
        return {}
    if src.rereadable():
        return checker.check_duplicates(src.lines())
    checker.problem(0, None, "duplicate custom_ids (pass a list or a file to locate them)")
    return {}


R = TypeVar("R")


def checked_passes(
    src: Source, one_pass: Callable[[LineChecker], R], total_of: Callable[[R], int], *,
    invalid_requests: InvalidRequests = "fail", open_rejected: Callable[[], IO[bytes]] | None = None,
    models: Iterable[str] | None = None, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    endpoints: Iterable[str] = OPENAI_ENDPOINTS,
) -> tuple[R, LineChecker]:
    """The one decision on invalid request lines, for every backend. ``one_pass`` reads ``src`` once, checks
    each line with the checker it is given and uses the valid ones (writes shards, stages rows...); then
    ``"fail"`` raises every problem (whatever the pass wrote is scratch), and ``"skip"`` keeps the pass's work
    with each invalid line set aside as one failure row in ``open_rejected()``. A repeated custom_id is only
    found after the pass: under ``"skip"`` (rarely) the pass runs again, setting the repeats aside first.

    :param src: the requests.
    :param one_pass: one pass over ``src`` with a fresh checker; returns its result.
    :param total_of: the number of request lines a result saw.
    :param invalid_requests: ``"fail"`` or ``"skip"``.
    :param open_rejected: returns a new writable binary file for the failure rows (``"skip"`` only).
    :param models: the models served (see :class:`LineChecker`).
    :param max_line_bytes: the per-request size limit.
    :param endpoints: the endpoints the backend serves (see :class:`LineChecker`).
    :returns: the last pass's result and its checker (``checker.rejected`` counts what was set aside).
    :raises InvalidRequestsError: every problem (``"fail"``); a problem with the whole input or no valid line
        left (``"skip"``).
    """
    skip = check_invalid_requests(invalid_requests) == "skip"
    if skip and open_rejected is None:
        raise ValueError('invalid_requests="skip" needs open_rejected')
    served = frozenset(models) if models is not None else None
    known: dict[int, str] = {}
    while True:
        fp = open_rejected() if skip and open_rejected is not None else None
        try:
            checker = LineChecker(name=src.name, max_line_bytes=max_line_bytes, models=served, known_duplicates=known,
                                  endpoints=tuple(endpoints), rejected=Rejected(fp) if fp is not None else None)
            result = one_pass(checker)
            found = locate_duplicates(checker, src) if not known else {}
            if skip and found:
                known = found
                continue
            checker.raise_if_problems(total_of(result))
        finally:
            if fp is not None:
                fp.close()
        return result, checker
