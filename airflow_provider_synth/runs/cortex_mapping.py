"""Snowflake Cortex requests: OpenAI chat bodies to ``AI_COMPLETE`` arguments and back.

A request whose messages are one user message maps to ``AI_COMPLETE(model, prompt, model_parameters,
response_format, show_details => TRUE, return_error_details => TRUE)``: a per-row error comes back as data,
not as a failed statement. A request with a system prompt or several turns maps to the conversation form,
``SNOWFLAKE.CORTEX.TRY_COMPLETE(model, [{role, content}...], options)`` (``AI_COMPLETE`` takes a single
string), which gives NULL on a per-row error, again without failing the statement.

Everything a request asks for that Cortex cannot do (tools, images, ``n > 1``, logprobs, stop sequences,
temperature over 1...) is refused here, before anything runs in Snowflake, with the file, line and custom_id.
Part of the Cortex run (:mod:`~airflow_provider_synth.runs.cortex`); no Airflow imports.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from airflow_provider_synth.batch.errors import InvalidRequestsError, Problem
from airflow_provider_synth.batch.jsonl import dumps, iter_jsonl, loads
from airflow_provider_synth.batch.paths import open_path
from airflow_provider_synth.batch.requests import CHAT
from airflow_provider_synth.batch.validate import InvalidRequests, LineChecker, Source, checked_passes

#: Models Cortex ``AI_COMPLETE`` / ``COMPLETE`` serve (Snowflake documentation, 2025). Region availability
#: varies; a model missing here can be allowed with ``extra_models``.
CORTEX_MODELS: frozenset[str] = frozenset(
    {
        "claude-3-5-sonnet", "claude-3-7-sonnet", "claude-4-opus", "claude-4-sonnet", "claude-sonnet-4-5",
        "claude-haiku-4-5", "deepseek-r1", "gemma-7b", "jamba-1.5-large", "jamba-1.5-mini",
        "jamba-instruct", "llama2-70b-chat", "llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b",
        "llama3.1-405b", "llama3.2-1b", "llama3.2-3b", "llama3.3-70b", "llama4-maverick", "llama4-scout",
        "mistral-7b", "mistral-large", "mistral-large2", "mixtral-8x7b", "openai-gpt-4.1", "openai-gpt-5",
        "openai-gpt-5-mini", "openai-gpt-5-nano", "openai-o4-mini", "reka-core", "reka-flash",
        "snowflake-arctic", "snowflake-llama-3.1-405b", "snowflake-llama-3.3-70b",
    }
)
#: What a Cortex model name (or a fine-tuned model's ``db.schema.name``) may look like.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Body keys that map to Cortex arguments.
_MAPPED = frozenset({"messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "response_format"})
#: Body keys that carry no meaning for Cortex and are dropped (bookkeeping, or defaults Cortex already has).
_IGNORED = frozenset({"model", "user", "metadata", "store", "seed", "service_tier", "stream_options",
                      "parallel_tool_calls", "safety_identifier", "prompt_cache_key"})
#: Body keys accepted only at their OpenAI default, which is also what Cortex does.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (1, None), "stream": (False, None), "logprobs": (False, None), "top_logprobs": (0, None),
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "stop": (None, [], ""),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "function_call": (None, "none"), "modalities": (None, ["text"]),
}

Mode = Literal["prompt", "conversation"]


class CortexMappingError(ValueError):
    """A chat body cannot be expressed as Cortex arguments; ``reasons`` lists every cause."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(reasons))


@dataclass(frozen=True)
class CortexCall:
    """One request as Cortex takes it.

    :param custom_id: the request's id.
    :param prompt: the single user prompt (``prompt`` mode, ``AI_COMPLETE``), else ``None``.
    :param conversation: ``[{"role", "content"}]`` (``conversation`` mode, ``TRY_COMPLETE``), else ``None``.
    :param model_parameters: ``temperature``, ``top_p``, ``max_tokens`` (only those the request sets).
    :param response_format: ``{"type": "json", "schema": {...}}`` or ``None``.
    """

    custom_id: str
    prompt: str | None
    conversation: list[dict[str, str]] | None
    model_parameters: dict[str, Any] = field(default_factory=dict)
    response_format: dict[str, Any] | None = None

    @property
    def mode(self) -> Mode:
        return "prompt" if self.prompt is not None else "conversation"

    def options(self) -> dict[str, Any]:
        """The ``options`` object of the conversation form: model parameters plus ``response_format``."""
        opts = dict(self.model_parameters)
        if self.response_format is not None:
            opts["response_format"] = self.response_format
        return opts


def check_model(model: str | None, extra_models: frozenset[str] | set[str] = frozenset()) -> str:
    """Return ``model`` if Cortex serves it (or the user allowed it), else raise ``ValueError``.

    :param model: the model name.
    :param extra_models: names to accept beyond :data:`CORTEX_MODELS` (new or fine-tuned models).
    """
    if not model or not isinstance(model, str):
        raise ValueError("no model: set the operator's model or body.model in the requests")
    if model in extra_models and MODEL_NAME_RE.fullmatch(model):
        return model
    if model not in CORTEX_MODELS:
        close = sorted(m for m in CORTEX_MODELS if m.split("-")[0] == model.split("-")[0])[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"model {model!r} is not a Cortex model{hint}; Cortex serves: {', '.join(sorted(CORTEX_MODELS))}. "
            "Pass extra_models to allow a newer or fine-tuned one."
        )
    return model


def _text_of(content: Any, where: str, reasons: list[str]) -> str | None:
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts: list[str] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                reasons.append(f"{where} has a {kind or type(part).__name__!s} content part: Cortex "
                               "AI_COMPLETE here takes text only")
                return None
        text = "\n".join(parts)
    else:
        reasons.append(f"{where}.content must be a string or a list of text parts")
        return None
    if not text.strip():
        reasons.append(f"{where}.content is empty")
        return None
    return text


def _map_messages(messages: Any, reasons: list[str]) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        reasons.append("body.messages must be a non-empty list")
        return []
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            reasons.append(f"{where} is not an object")
            continue
        role = "system" if msg.get("role") == "developer" else msg.get("role")
        if role not in ("system", "user", "assistant"):
            reasons.append(f"{where}.role {msg.get('role')!r} cannot map to Cortex (system, user, assistant only)")
            continue
        if msg.get("tool_calls") or msg.get("function_call"):
            reasons.append(f"{where} carries tool calls: Cortex AI_COMPLETE has no tools")
            continue
        text = _text_of(msg.get("content"), where, reasons)
        if text is not None:
            out.append({"role": role, "content": text})
    if len(out) == len(messages):
        reasons.extend(_order_problems(out))
    return out


def _order_problems(conv: list[dict[str, str]]) -> list[str]:
    """Cortex takes one optional leading system prompt, then user and assistant turns alternating."""
    turns = conv[1:] if conv and conv[0]["role"] == "system" else conv
    if any(m["role"] == "system" for m in turns):
        return ["a system message may only come first, and only once"]
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return [f"turns must alternate user/assistant starting with user; found {m['role']!r} "
                    f"where {expected!r} was expected"]
    if not turns or turns[-1]["role"] != "user":
        return ["the last message must be a user message"]
    return []


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float | None, reasons: list[str]) -> Any:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        reasons.append(f"body.{key} must be a number")
    elif value < lo or (hi is not None and value > hi):
        span = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
        reasons.append(f"body.{key}={value} is out of Cortex's range ({span})")
    return value


def _map_parameters(body: Mapping[str, Any], reasons: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if body.get("temperature") is not None:
        params["temperature"] = _number(body, "temperature", 0, 1, reasons)
    if body.get("top_p") is not None:
        params["top_p"] = _number(body, "top_p", 0, 1, reasons)
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            value = body[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                reasons.append(f"body.{key} must be a positive integer")
            params.setdefault("max_tokens", value)
    return params


def _map_response_format(rf: Any, reasons: list[str]) -> dict[str, Any] | None:
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict) and schema:
            return {"type": "json", "schema": schema}
        reasons.append("body.response_format.json_schema.schema is missing")
        return None
    if kind == "json_object":
        reasons.append("response_format json_object cannot map: Cortex structured output needs a JSON schema "
                       "(use type json_schema)")
        return None
    reasons.append(f"body.response_format type {kind!r} is not supported")
    return None


def map_chat_body(custom_id: str, body: Mapping[str, Any]) -> CortexCall:
    """Map one ``/v1/chat/completions`` body to a :class:`CortexCall`.

    :param custom_id: the request's id.
    :param body: the request body.
    :raises CortexMappingError: listing every part of the body Cortex cannot take.
    """
    reasons: list[str] = []
    for key, value in body.items():
        if key in _MAPPED or key in _IGNORED:
            continue
        if key in _DEFAULT_ONLY:
            if value not in _DEFAULT_ONLY[key]:
                reasons.append(f"body.{key}={value!r} cannot map to Cortex AI_COMPLETE (only the default)")
        else:
            reasons.append(f"body.{key} has no Cortex AI_COMPLETE equivalent")
    conv = _map_messages(body.get("messages"), reasons)
    params = _map_parameters(body, reasons)
    rf = _map_response_format(body.get("response_format"), reasons)
    if reasons:
        raise CortexMappingError(reasons)
    if len(conv) == 1 and conv[0]["role"] == "user":
        return CortexCall(custom_id, conv[0]["content"], None, params, rf)
    return CortexCall(custom_id, None, conv, params, rf)


def staging_row(seq: int, call: CortexCall) -> tuple[str, int, str | None, str | None, str, str | None]:
    """The requests-table row of a call: ``(CUSTOM_ID, SEQ, PROMPT, CONVERSATION, MODEL_PARAMETERS,
    RESPONSE_FORMAT)``, JSON as text. A conversation carries its ``response_format`` inside its options."""
    if call.conversation is not None:
        return (call.custom_id, seq, None, dumps(call.conversation).decode(), dumps(call.options()).decode(), None)
    rf = dumps(call.response_format).decode() if call.response_format is not None else None
    return (call.custom_id, seq, call.prompt, None, dumps(call.model_parameters).decode(), rf)


def table_parameters(params: Mapping[str, Any], conversation: bool) -> tuple[str, str | None]:
    """``(MODEL_PARAMETERS, RESPONSE_FORMAT)`` JSON for every row of a source table, from OpenAI chat parameters.

    :param params: ``temperature``, ``top_p``, ``max_tokens``, ``response_format``... as in a request body.
    :param conversation: the table holds conversations (the options then carry ``response_format``).
    :raises CortexMappingError: if a parameter cannot map.
    """
    if "messages" in params:
        raise CortexMappingError(["params must not hold messages: they come from the table"])
    call = map_chat_body("<table>", {**params, "messages": [{"role": "user", "content": "-"}]})
    if conversation:
        return dumps(call.options()).decode(), None
    rf = dumps(call.response_format).decode() if call.response_format is not None else None
    return dumps(call.model_parameters).decode(), rf


@dataclass
class CortexCheck:
    """The outcome of a clean pass over a request file.

    :param total: number of requests.
    :param model: the model the requests name (``None`` if they name none).
    :param fingerprint: sha256 of the file's request lines, so a changed input never resumes old tables.
    :param conversations: how many requests use the conversation form.
    :param invalid_lines: line numbers set aside as invalid (``invalid_requests="skip"``); counted in ``total``.
    :param synthetic_ids: how many of those are reported as ``line-<n>`` (no usable custom_id).
    """

    total: int = 0
    model: str | None = None
    fingerprint: str = ""
    conversations: int = 0
    invalid_lines: frozenset[int] = frozenset()
    synthetic_ids: int = 0

    @property
    def staged(self) -> int:
        """How many requests run in Cortex (the valid ones)."""
        return self.total - len(self.invalid_lines)


def _check_line(checker: LineChecker, lineno: int, raw: bytes) -> CortexCall | None:
    checked = checker.check(lineno, raw)
    if checked is None:
        return None
    if checked.url != CHAT:
        checker.problem(lineno, checked.custom_id, f"url {checked.url!r}: Cortex runs {CHAT} requests only")
        return None
    try:
        return map_chat_body(checked.custom_id, loads(raw)["body"])
    except CortexMappingError as exc:
        for reason in exc.reasons:
            checker.problem(lineno, checked.custom_id, reason)
        return None


def check_requests(source: Any, *, name: str | None = None, invalid_requests: InvalidRequests = "fail",
                   open_rejected: Callable[[], IO[bytes]] | None = None) -> CortexCheck:
    """Validate a request JSONL file for Cortex in one streaming pass (a second only to locate duplicates).

    Runs the core's line checks (JSON, fields, duplicate custom_ids) and the Cortex mapping of every line.

    :param source: a path, URL or path object of an OpenAI-format chat JSONL file.
    :param name: the name used in problem reports (default: the path).
    :param invalid_requests: ``"fail"``, or ``"skip"``: invalid lines become failure rows in
        ``open_rejected()`` and :func:`iter_calls` leaves them out (see
        :func:`~airflow_provider_synth.batch.validate.checked_passes`).
    :param open_rejected: returns a new writable binary file for the failure rows (``"skip"`` only).
    :raises InvalidRequestsError: listing every problem, with file, line and custom_id.
    """
    src = Source(source, name or str(source))

    def one_pass(checker: LineChecker) -> CortexCheck:
        result = CortexCheck()
        digest = hashlib.sha256()
        for lineno, raw in src.lines():
            result.total += 1
            digest.update(raw)
            digest.update(b"\n")
            call = _check_line(checker, lineno, raw)
            if call is not None and call.conversation is not None:
                result.conversations += 1
        result.fingerprint = digest.hexdigest()
        return result

    result, checker = checked_passes(src, one_pass, lambda r: r.total, invalid_requests=invalid_requests,
                                     open_rejected=open_rejected)
    result.model = checker.model
    if checker.rejected is not None:
        result.invalid_lines = frozenset(checker.rejected.lines)
        result.synthetic_ids = checker.rejected.synthetic
    return result


def iter_calls(source: Any, skip_lines: Collection[int] = ()) -> Iterator[tuple[int, CortexCall]]:
    """Yield ``(seq, call)`` for a file that :func:`check_requests` accepted (``seq`` is 1-based input order),
    leaving out the lines it set aside (``skip_lines``)."""
    with open_path(source, "rb") as fp:
        for seq, (lineno, raw) in enumerate(iter_jsonl(fp), start=1):
            if lineno in skip_lines:
                continue
            line = loads(raw)
            yield seq, map_chat_body(line["custom_id"], line["body"])


def table_problems(name: str, counts: Mapping[str, int], duplicates: list[tuple[Any, int]]) -> None:
    """Raise :class:`InvalidRequestsError` for a source table whose ids or prompts cannot run.

    :param name: the table's name, used as the "file" of each problem.
    :param counts: ``rows``, ``null_ids``, ``empty_inputs`` as counted in Snowflake.
    :param duplicates: up to a few ``(id, count)`` pairs of duplicated ids.
    """
    problems: list[Problem] = []
    if counts["rows"] == 0:
        problems.append(Problem(name, 0, None, "no requests: the table is empty"))
    if counts["null_ids"]:
        problems.append(Problem(name, 0, None, f"{counts['null_ids']} row(s) have a NULL id"))
    if counts["empty_inputs"]:
        problems.append(Problem(name, 0, None, f"{counts['empty_inputs']} row(s) have a NULL or empty prompt"))
    for value, n in duplicates:
        problems.append(Problem(name, 0, str(value), f"duplicate id ({n} rows)"))
    if problems:
        raise InvalidRequestsError(problems)


# ---------------------------------------------------------------------------------------------------------
# Answers back: a Cortex result row becomes an OpenAI chat.completion body or an error.

#: Error code written to failures for a row Cortex answered with an error.
CORTEX_ERROR = "cortex_error"


def _content_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return dumps(value).decode()


def completion_body(custom_id: str, details: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Turn Cortex's detailed answer (``{"choices": [{"messages"}], "created", "model", "usage"}``) into an
    OpenAI ``chat.completion`` body, usage included where Cortex reports it.

    :param custom_id: the request's id (the body's ``id`` is derived from it).
    :param details: the ``show_details`` object of ``AI_COMPLETE`` or the parsed ``COMPLETE`` answer.
    :param model: the model asked for (used when Cortex does not echo it).
    """
    choices = details.get("choices") or []
    out_choices = []
    for i, choice in enumerate(choices):
        text = choice.get("messages", choice.get("message", ""))
        out_choices.append({
            "index": i,
            "message": {"role": "assistant", "content": _content_text(text), "refusal": None},
            "logprobs": None,
            "finish_reason": choice.get("finish_reason") or "stop",
        })
    body: dict[str, Any] = {
        "id": f"cortex-{custom_id}",
        "object": "chat.completion",
        "created": int(details.get("created") or 0),
        "model": details.get("model") or model,
        "choices": out_choices,
    }
    usage = details.get("usage")
    if isinstance(usage, dict):
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        body["usage"] = {**usage, "prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": int(usage.get("total_tokens") or prompt + completion)}
    return body


@dataclass(frozen=True)
class Answer:
    """One read-back row, classified.

    :param custom_id: the request's id.
    :param body: the chat.completion body when Cortex answered, else ``None``.
    :param error: ``(code, message)`` when the row failed or is missing, else ``None``.
    :param missing: the row has no answer at all (its statement did not run or did not finish).
    """

    custom_id: str
    body: dict[str, Any] | None
    error: tuple[str, str] | None
    missing: bool = False


def classify_row(custom_id: str, answered: bool, output: str | None, model: str) -> Answer:
    """Classify one row read back from the results table.

    :param custom_id: the request's id.
    :param answered: the results table has a row for it.
    :param output: that row's ``OUTPUT``: ``AI_COMPLETE``'s ``{"value", "error"}`` JSON, or ``TRY_COMPLETE``'s
        answer JSON, or NULL (``TRY_COMPLETE`` failed).
    :param model: the model asked for.
    """
    if not answered:
        return Answer(custom_id, None, ("missing", "no answer: the Cortex statement for this row did not "
                                        "complete"), missing=True)
    details = loads(output) if output else None
    if isinstance(details, str):  # COMPLETE answers JSON text inside a string
        details = loads(details)
    if isinstance(details, dict) and ("error" in details or "value" in details) and "choices" not in details:
        if details.get("error"):
            return Answer(custom_id, None, (CORTEX_ERROR, str(details["error"])))
        details = details.get("value")
        if isinstance(details, str):
            details = loads(details)
    if not isinstance(details, dict) or not details.get("choices"):
        return Answer(custom_id, None, (CORTEX_ERROR, "Cortex returned no completion for this row (the "
                                        "conversation form, TRY_COMPLETE, gives no error details)"))
    return Answer(custom_id, completion_body(custom_id, details, model), None)
