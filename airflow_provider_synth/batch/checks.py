"""Output checks: the one decision on whether a ``200`` answer is usable data, for every backend.

A billed answer can still be useless: cut off (``finish_reason: "length"``, Anthropic's ``stop_reason:
"max_tokens"``), refused (``message.refusal``, a ``content_filter`` stop, Anthropic's ``refusal`` stop), or structured output that does not fit the schema the request asked for. With
:class:`OutputChecks` the merge sends such answers to ``failures.jsonl`` (with the reason and the raw text),
never to ``results.jsonl``, and the retry rounds resubmit them alone (vLLM: inside the running engine). With a
pydantic model (or a JSON schema) the results lines carry the validated object under ``"parsed"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from airflow_provider_synth.batch.extract import STRUCTURED_OUTPUT_TOOL
from airflow_provider_synth.batch.jsonl import dumps, loads

#: The kinds of unusable answers, as failure codes and manifest counts.
TRUNCATED, REFUSED, SCHEMA_INVALID = "truncated", "refused", "schema_invalid"
UNUSABLE_KINDS = (TRUNCATED, REFUSED, SCHEMA_INVALID)
#: How a Responses API ``incomplete_details.reason`` reads as a chat ``finish_reason``.
_INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}
#: Characters of an unusable answer's text kept in its failure line.
MAX_KEPT_TEXT = 100_000


@dataclass(frozen=True)
class OutputChecks:
    """What makes an answer unusable, and what happens to unusable answers.

    The default, on every backend (:func:`checks_for`): a schema the user wrote is checked. A template's
    ``response_format`` is validated whether or not ``checks=`` is given (``checks=None`` means
    ``OutputChecks()``); ``OutputChecks(schema=False)`` turns that off. Nothing else is checked unless asked.

    :param finish_reasons: finish reasons that make an answer unusable, e.g. ``{"length", "content_filter"}``
        (a Responses API answer left ``incomplete`` for ``max_output_tokens`` counts as ``"length"``).
        ``length`` is counted as ``truncated``, ``content_filter`` as ``refused``, any other by its name.
    :param refusal: an answer with a refusal (``message.refusal``, a Responses ``refusal`` part) is unusable.
    :param schema: a pydantic model class, a JSON schema, or a ``response_format`` dict; the answer's text
        must validate against it (``json_object``: any JSON object). ``None`` (default): the template's
        ``response_format``, if any; ``False``: no schema check.
    :param retry: resubmit unusable answers in the retry rounds (``retry_failed_requests``), alone (vLLM: at
        once, inside the running engine).
    :param retry_body: body fields to change when a kind is retried, e.g.
        ``{"truncated": {"max_completion_tokens": 2000}}``; keys are kinds (or finish reasons).
    :param parsed: with a schema, write the validated object into each results line as ``"parsed"``.
    :param direct_tail: OpenAI and Azure only: a retry round of at most this many requests goes through the
        synchronous API (bounded concurrency, the SDK's retries, the direct price) instead of another batch.
        0 (default): never.
    :param direct_concurrency: the most direct requests in flight at once.
    :param direct_service_tier: the tail's ``service_tier``: ``"flex"`` (slower answers billed at batch prices,
        for the models that offer it; a 15-minute timeout per request; a 429 "resource unavailable" is a
        retryable failure for the next round), ``"default"``, or ``None`` (the project's default tier).
    :param direct_tier_fallback: when flex has no capacity (429 after the SDK's retries), answer that request at
        the default tier and direct price instead; the budget then counts the tail at the direct price.
    """

    finish_reasons: Collection[str] = frozenset()
    refusal: bool = False
    schema: Any = None
    retry: bool = True
    retry_body: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    parsed: bool = True
    direct_tail: int = 0
    direct_concurrency: int = 8
    direct_service_tier: str | None = None
    direct_tier_fallback: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.finish_reasons, str):
            raise TypeError("finish_reasons is a collection of reasons, e.g. {'length'}, not a string")
        if self.direct_tail < 0 or self.direct_concurrency < 1:
            raise ValueError("direct_tail must be >= 0 and direct_concurrency >= 1")
        if self.direct_service_tier not in (None, "flex", "default"):
            raise ValueError(f"direct_service_tier must be 'flex', 'default' or None, got {self.direct_service_tier!r}")

    @property
    def active(self) -> bool:
        """Whether any answer can be judged unusable."""
        return bool(self.finish_reasons) or self.refusal or self.schema not in (None, False)

    def to_spec(self) -> dict[str, Any]:
        """The checks as JSON (a pydantic model as its JSON schema), stored in a run's plan so that a later
        re-merge (the CLI's ``download``) judges answers the same way; ``direct_*`` are left out."""
        schema = None if self.schema is False else self.schema
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        return {"finish_reasons": sorted(self.finish_reasons), "refusal": self.refusal, "schema": schema,
                "retry": self.retry, "retry_body": {k: dict(v) for k, v in self.retry_body.items()},
                "parsed": self.parsed}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> OutputChecks | None:
        """The checks :meth:`to_spec` stored, or ``None``."""
        if not spec:
            return None
        return cls(finish_reasons=frozenset(spec.get("finish_reasons") or ()), refusal=bool(spec.get("refusal")),
                   schema=spec.get("schema"), retry=bool(spec.get("retry", True)),
                   retry_body=dict(spec.get("retry_body") or {}), parsed=bool(spec.get("parsed", True)))

    def checker(self) -> Checker | None:
        """The compiled checks (schema validator built once), or ``None`` when nothing is checked."""
        return Checker(self) if self.active else None


def checks_for(checks: OutputChecks | None, response_format: Any) -> OutputChecks | None:
    """THE default of ``checks`` beside a template's ``response_format``, for every backend: a schema the user
    wrote is checked. ``checks=None`` with a ``response_format`` gives ``OutputChecks(schema=response_format)``;
    given checks without a schema get it too; ``schema=False`` opts out (no schema check).

    :param checks: the task's ``checks=``.
    :param response_format: the template's ``response_format`` (``None``: none).
    :return: the checks to run (``None``: nothing to check).
    """
    if checks is not None and checks.schema is False:
        return dataclasses.replace(checks, schema=None)
    if response_format is None:
        return checks
    if checks is None:
        return OutputChecks(schema=response_format)
    return checks if checks.schema is not None else dataclasses.replace(checks, schema=response_format)


class Unusable(NamedTuple):
    """A ``200`` answer judged unusable.

    :param kind: ``truncated``, ``refused``, ``schema_invalid`` (or a finish reason's name).
    :param message: why, for people.
    :param text: the answer's raw text, kept for inspection.
    :param retryable: whether the retry rounds resubmit it.
    :param usage: the tokens it burned: (prompt, cached, completion, reasoning, total).
    """

    custom_id: str
    kind: str
    message: str
    text: str | None
    retryable: bool
    usage: tuple[int, int, int, int, int] | None


# -- decoding only what the checks read --------------------------------------------------------------------


class _Msg(msgspec.Struct, gc=False):
    content: Any = None
    refusal: Any = None


class _Choice(msgspec.Struct, gc=False):
    finish_reason: str | None = None
    message: _Msg | None = None
    text: Any = None


class _Part(msgspec.Struct, gc=False):
    type: str | None = None
    text: Any = None
    refusal: Any = None
    # an Anthropic tool_use block
    name: Any = None
    input: Any = None


class _Item(msgspec.Struct, gc=False):
    type: str | None = None
    content: list[_Part] | None = None


class _Incomplete(msgspec.Struct, gc=False):
    reason: str | None = None


class _Body(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    output: list[_Item] | None = None
    status: str | None = None
    incomplete_details: _Incomplete | None = None
    # an Anthropic message (the Messages API, the Message Batches API, Claude on Bedrock)
    type: str | None = None
    content: list[_Part] | None = None
    stop_reason: str | None = None


class _Resp(msgspec.Struct, gc=False):
    body: _Body | None = None


class _Line(msgspec.Struct, gc=False):
    custom_id: str
    response: _Resp | None = None


_line_decoder = msgspec.json.Decoder(_Line)


class _Answer(NamedTuple):
    finish_reason: str | None
    refusal: str | None
    text: str | None


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(texts) if texts else None
    return None


#: How an Anthropic ``stop_reason`` reads as a chat ``finish_reason`` (``refusal`` is also a refusal).
_STOP_REASONS = {"max_tokens": "length", "model_context_window_exceeded": "length", "refusal": "content_filter",
                 "end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls"}


def _anthropic_answer(body: _Body) -> _Answer:
    parts = body.content or []
    texts = [p.text for p in parts if p.type == "text" and isinstance(p.text, str)]
    text = "".join(texts) if texts else None
    if text is None:
        tool = next((p for p in parts if p.type == "tool_use" and p.name == STRUCTURED_OUTPUT_TOOL), None)
        text = dumps(tool.input).decode() if tool is not None else None
    reason = _STOP_REASONS.get(body.stop_reason or "", body.stop_reason)
    refusal = (text or "the model refused (stop_reason 'refusal')") if body.stop_reason == "refusal" else None
    return _Answer(reason, refusal, text)


def _answers(body: _Body) -> list[_Answer]:
    """Each choice of a chat/completions body, the one answer of a Responses body, or of an Anthropic
    message."""
    if body.type == "message" and body.content is not None:
        return [_anthropic_answer(body)]
    if body.choices:
        out = []
        for c in body.choices:
            msg = c.message
            text = _text_of(msg.content) if msg is not None else (c.text if isinstance(c.text, str) else None)
            refusal = msg.refusal if msg is not None and isinstance(msg.refusal, str) and msg.refusal else None
            out.append(_Answer(c.finish_reason, refusal, text))
        return out
    if body.output is not None or body.status is not None:
        texts, refusal = [], None
        for item in body.output or ():
            for part in item.content or ():
                if part.type == "refusal" and isinstance(part.refusal, str):
                    refusal = part.refusal
                elif part.type == "output_text" and isinstance(part.text, str):
                    texts.append(part.text)
        reason = None
        if body.status == "incomplete":
            why = body.incomplete_details.reason if body.incomplete_details is not None else None
            reason = _INCOMPLETE_REASONS.get(why or "", why or "length")
        return [_Answer(reason, refusal, "".join(texts) if texts else None)]
    return []  # embeddings: nothing to check


def _kind_of(reason: str) -> str:
    return {"length": TRUNCATED, "content_filter": REFUSED}.get(reason, reason)


class _Schema:
    """Validates a text against a pydantic model, a JSON schema or ``json_object``; returns the parsed JSON."""

    def __init__(self, schema: Any) -> None:
        self.model: Any = None
        self.validator: Any = None
        if isinstance(schema, Mapping):
            if schema.get("type") == "json_schema":
                schema = (schema.get("json_schema") or {}).get("schema") or {}
            elif schema.get("type") == "json_object":
                schema = {"type": "object"}
            import jsonschema

            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            self.validator = cls(schema)
        elif isinstance(schema, type) and hasattr(schema, "model_validate_json"):
            self.model = schema
        else:
            raise TypeError(f"schema must be a pydantic model class, a JSON schema or a response_format dict, "
                            f"got {schema!r}")

    def parse(self, text: str) -> tuple[bytes | None, str | None]:
        """(the parsed object as compact JSON, None) or (None, why it does not validate)."""
        if self.model is not None:
            import pydantic

            try:
                obj = self.model.model_validate_json(text)
            except pydantic.ValidationError as exc:
                errors = exc.errors(include_url=False)
                if not errors:
                    return None, str(exc)
                where = ".".join(str(p) for p in errors[0]["loc"]) or "(root)"
                return None, f"{len(errors)} validation error(s) for {self.model.__name__}; {where}: " \
                             f"{errors[0]['msg']}"
            return obj.model_dump_json().encode(), None
        try:
            value = loads(text)
        except ValueError as exc:
            return None, f"not JSON: {exc}"
        error = next(iter(self.validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return None, f"does not fit the schema at {where}: {error.message}"
        return dumps(value), None


class Checker:
    """:class:`OutputChecks` compiled: judge one output line (see :meth:`judge`).

    :param checks: the checks.
    """

    def __init__(self, checks: OutputChecks) -> None:
        self.checks = checks
        self.reasons = frozenset(checks.finish_reasons)
        schema = checks.schema
        if isinstance(schema, Mapping) and schema.get("type") == "text":  # no structure asked: nothing to validate
            schema = None
        self.schema = _Schema(schema) if schema not in (None, False) else None

    def judge(self, raw: bytes, usage: tuple[int, int, int, int, int] | None = None) -> Unusable | bytes | None:
        """Judge a success line: an :class:`Unusable`, the line to write with ``"parsed"`` added, or ``None``
        (usable, write it unchanged)."""
        line = _line_decoder.decode(raw)
        body = line.response.body if line.response is not None else None
        answers = _answers(body) if body is not None else []
        parsed: list[bytes] = []
        for ans in answers:
            why = self._why(ans, parsed)
            if why is not None:
                kind, message = why
                text = ans.text if ans.text is None or len(ans.text) <= MAX_KEPT_TEXT else ans.text[:MAX_KEPT_TEXT]
                return Unusable(line.custom_id, kind, message, text if text is not None else ans.refusal,
                                self.checks.retry, usage)
        if not parsed or not self.checks.parsed:
            return None
        value = parsed[0] if len(parsed) == 1 else b"[" + b",".join(parsed) + b"]"
        return raw.rstrip()[:-1] + b',"parsed":' + value + b"}"

    def _why(self, ans: _Answer, parsed: list[bytes]) -> tuple[str, str] | None:
        if ans.finish_reason is not None and ans.finish_reason in self.reasons:
            return _kind_of(ans.finish_reason), f"the answer stopped with finish_reason {ans.finish_reason!r}"
        if self.checks.refusal and ans.refusal is not None:
            return REFUSED, f"the model refused: {ans.refusal[:200]}"
        if self.schema is not None:
            if ans.text is None:
                return SCHEMA_INVALID, "the answer has no text to validate against the schema"
            obj, error = self.schema.parse(ans.text)
            if obj is None:
                return SCHEMA_INVALID, str(error)
            parsed.append(obj)
        return None

    def retry_body(self, kind: str) -> Mapping[str, Any] | None:
        """Body fields to change when an answer of ``kind`` is retried, if the user declared any."""
        changes = self.checks.retry_body
        if kind in changes:
            return changes[kind]
        reason = {TRUNCATED: "length", REFUSED: "content_filter"}.get(kind)
        return changes.get(reason) if reason is not None else None


def sum_checks(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The ``checks`` sections of several manifests (shards of one run) added up; ``None`` when none has one."""
    if not parts:
        return None
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == "usage":
                from airflow_provider_synth.batch.usage import Usage

                total["usage"] = Usage.from_dict(total.get("usage") or {}).add(Usage.from_dict(value)).as_dict()
            elif key == "rounds":
                total[key] = max(int(total.get(key) or 0), int(value or 0))
            elif isinstance(value, int | float):
                total[key] = round(total.get(key, 0) + value, 6) if isinstance(value, float) else \
                    total.get(key, 0) + value
    return total


def changed_body(body: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a request body with ``changes`` applied (``None`` values remove a field)."""
    out = dict(body)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def retry_line(raw: bytes, changes: Mapping[str, Any]) -> bytes:
    """A request line with ``changes`` applied to its body (see :func:`changed_body`)."""
    request = loads(raw)
    request["body"] = changed_body(request.get("body") or {}, changes)
    return dumps(request)
