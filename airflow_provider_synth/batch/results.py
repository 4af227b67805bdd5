"""Parse Batch API output and error lines (OpenAI, Azure, vLLM ``run-batch``) and build them.

An output line is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": {"code", "message"} | null}``. Error files come in two shapes: an HTTP error (``response.status_code``
!= 200 with ``body.error``), or ``response: null`` with ``error.code`` (``batch_expired``,
``batch_cancelled``, ``request_timeout``).
"""

from __future__ import annotations

import hashlib
from itertools import repeat
from operator import attrgetter, is_
from typing import Any, NamedTuple

import msgspec

from airflow_provider_synth.batch.errors import OutputFormatError
from airflow_provider_synth.batch.jsonl import dumps

#: THE retry/transient table: the HTTP statuses that may go away by themselves (timeout, conflict, throttled,
#: a server briefly broken or overloaded: 529 is Anthropic's "overloaded"). One table for a request's failure
#: in a result line (a retry round can fix it) and for a poll (another poll can), for every backend: the
#: hooks' ``is_transient`` and the Cortex SQL API read it too. 501 (not implemented), 505 (HTTP version) and
#: the other 4xx say the request itself is wrong: retrying them pays again for the same answer.
TRANSIENT_HTTP_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
#: The failure code of a request whose answer is in a line of the service's output that could not be read.
UNREADABLE_CODE = "output_unreadable"
#: Line-level error codes (no HTTP status: ``response`` null, or an engine's own code) a new batch can fix.
RETRYABLE_ERROR_CODES = frozenset({"batch_expired", "request_timeout", "missing", "rate_limit_exceeded",
                                   "server_error", "timeout", "internal_error", UNREADABLE_CODE})


def is_transient_status(status_code: int | None) -> bool:
    """Whether an HTTP status may go away by itself (:data:`TRANSIENT_HTTP_STATUSES`).

    :param status_code: the HTTP status (``None``: none was given).
    """
    return status_code in TRANSIENT_HTTP_STATUSES


def is_retryable(status_code: int | None, code: str | None) -> bool:
    """Whether a retry round can turn this failure into a success: an HTTP status of THE transient table
    (:data:`TRANSIENT_HTTP_STATUSES`), or, for a line without a status, ``batch_expired``,
    ``request_timeout``, missing lines and the codes of :data:`RETRYABLE_ERROR_CODES`. Never 4xx validation
    errors, never ``batch_cancelled`` (somebody cancelled on purpose). When a line has a status, the status
    decides (a 501 ``server_error`` is not retried)."""
    if status_code is not None:
        return is_transient_status(status_code)
    return code in RETRYABLE_ERROR_CODES


class _Err(msgspec.Struct, gc=False):
    code: Any = None
    message: Any = None
    type: Any = None


#: An ``error`` as services write it: an object, a bare message, or (rarely) any other JSON value. Decoded with
#: the line: on a success it is ``null`` (``None``), cheaper to decode than to keep raw.
_ErrValue = _Err | str | int | float | bool | list[Any] | None


class _Details(msgspec.Struct, gc=False):
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    prompt_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None
    # Anthropic: input_tokens leaves out the tokens written to and read from the prompt cache
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def counts(self) -> tuple[int, int, int, int, int]:
        """(prompt, cached, completion, reasoning, total), whichever API shape reported them. An Anthropic
        usage's prompt is every input token (uncached, cache writes, cache reads); its cached, the reads."""
        prompt = self.prompt_tokens if self.prompt_tokens is not None else (self.input_tokens or 0)
        completion = self.completion_tokens if self.completion_tokens is not None else (self.output_tokens or 0)
        pd = self.prompt_tokens_details or self.input_tokens_details
        cd = self.completion_tokens_details or self.output_tokens_details
        cached = (pd.cached_tokens or 0) if pd is not None else 0
        if self.cache_creation_input_tokens is not None or self.cache_read_input_tokens is not None:
            cached = self.cache_read_input_tokens or 0
            prompt += (self.cache_creation_input_tokens or 0) + cached
        reasoning = (cd.reasoning_tokens or 0) if cd is not None else 0
        total = self.total_tokens if self.total_tokens is not None else prompt + completion
        return prompt, cached, completion, reasoning, total


class _BodyErr(msgspec.Struct, gc=False):
    error: _ErrValue = None
    usage: _Usage | None = None


class _Response(msgspec.Struct, gc=False):
    status_code: int | None = None
    request_id: str | None = None
    body: _BodyErr | None = None
    # vLLM/aphrodite run_batch before 0.5 wrote the body itself as "response"
    object: str | None = None
    usage: _Usage | None = None


class _Out(msgspec.Struct, gc=False):
    custom_id: str
    response: _Response | None = None
    error: _ErrValue = None


_out_decoder = msgspec.json.Decoder(_Out)


def _usage_counts(usage: _Usage | None) -> tuple[int, int, int, int, int] | None:
    return usage.counts() if usage is not None else None


def _error(value: Any) -> _Err | None:
    if value is None or isinstance(value, _Err):
        return value
    return _Err(message=value if isinstance(value, str) else dumps(value).decode())


class ParsedOutput(NamedTuple):
    """One output or error line, classified.

    :param ok: the request succeeded (HTTP 200 and no error).
    :param usage: (prompt, cached, completion, reasoning, total) tokens of a success, else ``None``.
    :param raw: the line as read, written through unchanged to ``results.jsonl``.
    """

    custom_id: str
    ok: bool
    status_code: int | None
    error_code: str | None
    error_message: str | None
    retryable: bool
    usage: tuple[int, int, int, int, int] | None
    raw: bytes


def parse_output_line(raw: bytes) -> ParsedOutput:
    """Classify one line of an output or error file.

    :raises OutputFormatError: the line is not an output line (no custom_id, malformed JSON).
    """
    try:
        out = _out_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise OutputFormatError(f"not a batch output line ({exc}): {raw[:200]!r}") from None
    return classify(out, raw)


def is_ok(out: _Out) -> bool:
    """Whether a decoded output line is a success (cheap: no classification)."""
    resp = out.response
    if resp is None or out.error is not None:
        return False
    if resp.status_code is None:
        return resp.object is not None
    return resp.status_code == 200 and (resp.body is None or resp.body.error is None)


def success_raw_and_usage(out: _Out, raw: bytes) -> tuple[bytes, tuple[int, int, int, int, int] | None]:
    """For a line :func:`is_ok` accepted: the line to write (normalized if legacy) and its usage counts."""
    resp = out.response
    assert resp is not None
    if resp.status_code is None:
        parsed = _legacy_vllm(out.custom_id, raw, resp)
        return parsed.raw, parsed.usage
    return raw, (_usage_counts(resp.body.usage) if resp.body is not None else None)


_get_response = attrgetter("response")
_get_status = attrgetter("status_code")
_get_body = attrgetter("body")
_get_usage = attrgetter("usage")


def bulk_success(outs: list[_Out], raws: list[bytes]) -> tuple[list[bytes], list[tuple[int, int, int, int, int]]]:
    """Lines to write and usage counts of many successes (lines :func:`is_ok` accepted)."""
    resps = list(map(_get_response, outs))
    if any(map(is_, resps, repeat(None))) or any(map(is_, map(_get_status, resps), repeat(None))):  # old vLLM
        pairs = [success_raw_and_usage(out, raw) for out, raw in zip(outs, raws, strict=True)]
        return [p[0] for p in pairs], [p[1] for p in pairs if p[1] is not None]
    return raws, [sum_usage(list(filter(None, map(_get_usage, filter(None, map(_get_body, resps))))))]


_COLUMNS = [attrgetter(name) for name in ("prompt_tokens", "completion_tokens", "total_tokens")]
_PROMPT_DETAILS = attrgetter("prompt_tokens_details")
_COMPLETION_DETAILS = attrgetter("completion_tokens_details")
_CACHED = attrgetter("cached_tokens")
_REASONING = attrgetter("reasoning_tokens")


def sum_usage(usages: list[_Usage]) -> tuple[int, int, int, int, int]:
    """(prompt, cached, completion, reasoning, total) over many usage objects, a column at a time."""
    try:  # Chat Completions' shape, every count present: summed without a Python loop
        prompt, completion, total = (sum(map(column, usages)) for column in _COLUMNS)
        cached = sum(map(_CACHED, filter(None, map(_PROMPT_DETAILS, usages))))
        reasoning = sum(map(_REASONING, filter(None, map(_COMPLETION_DETAILS, usages))))
        return prompt, cached, completion, reasoning, total
    except TypeError:  # a missing count (None), or the Responses API's input_/output_tokens
        pass
    counts = [u.counts() for u in usages]
    return (sum([c[0] for c in counts]), sum([c[1] for c in counts]), sum([c[2] for c in counts]),
            sum([c[3] for c in counts]), sum([c[4] for c in counts]))


def classify(out: _Out, raw: bytes) -> ParsedOutput:
    """Turn a decoded output line into a :class:`ParsedOutput`."""
    resp = out.response
    if resp is not None and resp.status_code is None and resp.object is not None:
        return _legacy_vllm(out.custom_id, raw, resp)
    status = resp.status_code if resp is not None else None
    body = resp.body if resp is not None else None
    if is_ok(out):
        usage = _usage_counts(body.usage) if body is not None else None
        return ParsedOutput(out.custom_id, True, status, None, None, False, usage, raw)
    e = _error(out.error) or (_error(body.error) if body is not None else None)
    code = None if e is None or e.code is None else str(e.code)
    if code is None and e is not None and e.type:
        code = str(e.type)
    if code is None:
        code = f"http_{status}" if status is not None else "unknown_error"
    message = (e.message if e is not None else None) or f"request failed with status {status}"
    if not isinstance(message, str):
        message = dumps(message).decode()
    return ParsedOutput(out.custom_id, False, status, code, message, is_retryable(status, code), None, raw)


def _legacy_vllm(custom_id: str, raw: bytes, resp: _Response) -> ParsedOutput:
    """Normalize an old run_batch line (the body as ``response``) into the standard shape."""
    from airflow_provider_synth.batch.jsonl import loads

    line = loads(raw)
    body = line["response"]
    normalized = success_line(custom_id, body, request_id=body.get("id"), line_id=line.get("id"))
    return ParsedOutput(custom_id, True, 200, None, None, False, _usage_counts(resp.usage), normalized)


def _line_id(custom_id: str, prefix: str) -> str:
    return prefix + hashlib.sha1(custom_id.encode()).hexdigest()[:24]


def success_line(custom_id: str, body: Any, *, request_id: str | None = None, line_id: str | None = None,
                 status_code: int = 200) -> bytes:
    """An output line for a succeeded request (no trailing newline)."""
    return dumps({
        "id": line_id or _line_id(custom_id, "batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id or _line_id(custom_id, "req_"),
                     "body": body},
        "error": None,
    })


def error_line(custom_id: str, code: str, message: str, *, status_code: int | None = None,
               request_id: str | None = None, line_id: str | None = None) -> bytes:
    """An error-file line: with ``status_code`` the HTTP shape (``body.error``), else ``response: null``."""
    if status_code is None:
        return dumps({"id": line_id or _line_id(custom_id, "batch_req_"), "custom_id": custom_id,
                      "response": None, "error": {"code": code, "message": message}})
    body = {"error": {"message": message, "type": "invalid_request_error" if status_code < 500 else
                      "server_error", "param": None, "code": code}}
    return dumps({"id": line_id or _line_id(custom_id, "batch_req_"), "custom_id": custom_id,
                  "response": {"status_code": status_code, "request_id": request_id or _line_id(custom_id, "req_"),
                               "body": body},
                  "error": None})
