"""OpenAI batch request lines -> Anthropic Messages params, and Anthropic results -> OpenAI output lines.

Pure: no Airflow, no SDK, no network. The Message Batches run (:mod:`~airflow_provider_synth.runs.anthropic`)
and the Bedrock batch run (Claude models' native body) share it, and the docs' translation table
(``docs/operators/anthropic.md``) describes what :func:`to_params` does field by field.

Two API versions differ on sampling. ``2023-06-01`` (anthropic SDK 1.x) takes ``temperature`` (0-1) and
``top_p``; ``2026-10-21`` (SDK 2.x, the default here, as the SDK sends it) has neither and carries structured
output in ``output_config.format``. An OpenAI line whose sampling fields the chosen version cannot take is
refused (``sampling="error"``, the default: its answers would not be the ones asked for) or sent without them
(``sampling="drop"``, counted per run); never silently changed.

A line is refused before anything is sent when it cannot be translated faithfully; the error names the file,
the line and the custom_id (:class:`~airflow_provider_synth.batch.errors.InvalidRequestsError`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from airflow_provider_synth.batch.errors import InvalidRequestsError, Problem
from airflow_provider_synth.batch.extract import STRUCTURED_OUTPUT_TOOL
from airflow_provider_synth.batch.jsonl import dumps, loads
from airflow_provider_synth.batch.requests import CHAT, canonical_url
from airflow_provider_synth.batch.results import error_line, success_line
from airflow_provider_synth.batch.usage import Price, Usage, cost_usd

#: The API version the anthropic SDK 2.x sends (``anthropic-version``), and the one SDK 1.x sent.
API_VERSION_2026 = "2026-10-21"
API_VERSION_2023 = "2023-06-01"
API_VERSIONS = (API_VERSION_2026, API_VERSION_2023)
#: ``max_tokens`` of a line that sets neither ``max_tokens`` nor ``max_completion_tokens`` (Anthropic requires it).
DEFAULT_MAX_TOKENS = 4096
#: Anthropic's custom_id rule.
CUSTOM_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Prefix of an id mapped from a user's custom_id that breaks Anthropic's rule (the rest: a sha256 prefix).
MAPPED_ID_PREFIX = "synth-"
#: The name of the one forced tool that carries structured output where the API version has no
#: ``output_config`` (``2023-06-01``); :func:`~airflow_provider_synth.batch.extract.extract_text` reads its input
#: as the answer's text.
STRUCTURED_TOOL = STRUCTURED_OUTPUT_TOOL
#: Per request and per batch, as the Message Batches API documents them.
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1000 * 1000

Sampling = Literal["error", "drop"]
StructuredOutput = Literal["auto", "output_config", "tool"]

#: OpenAI body fields that have no Anthropic counterpart and change the answers: refused, or dropped with
#: ``sampling="drop"``.
_SAMPLING_ONLY = ("seed", "frequency_penalty", "presence_penalty", "logit_bias")
#: OpenAI body fields with no effect on a batch answer's content: dropped.
_IGNORED = frozenset({"store", "metadata", "stream_options", "prediction", "web_search_options"})
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_DATA_URL = re.compile(r"data:(?P<mime>[\w/+.-]+);base64,(?P<data>.*)", re.S)


class TranslationError(ValueError):
    """One request line cannot be translated faithfully; the message says why and what to do."""


@dataclass(frozen=True)
class Translation:
    """How OpenAI lines become Messages params.

    :param api_version: the ``anthropic-version`` the requests are sent with: ``2026-10-21`` (SDK 2.x) or
        ``2023-06-01`` (SDK 1.x); decides what ``temperature``/``top_p`` and ``response_format`` become.
    :param default_max_tokens: ``max_tokens`` of a line that sets none.
    :param sampling: ``temperature``, ``top_p``, ``seed``, penalties and ``logit_bias`` the version cannot take:
        ``"error"`` refuses the line, ``"drop"`` sends it without them.
    :param structured_output: ``response_format`` (JSON schema) as ``output_config.format`` (``2026-10-21``
        only) or as one forced tool (:data:`STRUCTURED_TOOL`); ``"auto"``: the version's own way.
    :param model: the model of a line that names none (never replaces a line's own).
    """

    api_version: str = API_VERSION_2026
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: Sampling = "error"
    structured_output: StructuredOutput = "auto"
    model: str | None = None

    def __post_init__(self) -> None:
        if self.api_version not in API_VERSIONS:
            raise ValueError(f"api_version must be one of {API_VERSIONS}, got {self.api_version!r}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.sampling not in ("error", "drop"):
            raise ValueError(f"sampling must be 'error' or 'drop', got {self.sampling!r}")
        if self.structured_output not in ("auto", "output_config", "tool"):
            raise ValueError(f"structured_output must be 'auto', 'output_config' or 'tool', "
                             f"got {self.structured_output!r}")
        if self.structured_output == "output_config" and self.api_version == API_VERSION_2023:
            raise ValueError("structured_output='output_config' needs api_version 2026-10-21")

    @property
    def has_sampling(self) -> bool:
        """Whether the version takes ``temperature`` and ``top_p``."""
        return self.api_version == API_VERSION_2023

    @property
    def structured_as_tool(self) -> bool:
        """Whether structured output goes as one forced tool (the only way on ``2023-06-01``)."""
        return self.structured_output == "tool" or (self.structured_output == "auto"
                                                    and self.api_version == API_VERSION_2023)


def anthropic_custom_id(custom_id: str) -> str:
    """The custom_id sent to Anthropic: the user's own when it fits ``[A-Za-z0-9_-]{1,64}``, else
    :data:`MAPPED_ID_PREFIX` and a sha256 prefix of it (the same id on every try)."""
    if CUSTOM_ID_RE.fullmatch(custom_id):
        return custom_id
    return MAPPED_ID_PREFIX + hashlib.sha256(custom_id.encode()).hexdigest()[:40]


# -- one OpenAI chat body -> Messages params -------------------------------------------------------------------


def _text_parts(content: Any, where: str) -> str:
    """A system/developer message's content as one string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise TranslationError(f"{where}: only text parts can become the system prompt, got {part!r:.80}")
            texts.append(part["text"])
        return "".join(texts)
    raise TranslationError(f"{where}: content must be a string or a list of text parts")


def _image_block(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    if not isinstance(url, str) or not url:
        raise TranslationError(f"{where}: an image_url part needs a url")
    if url.startswith("data:"):
        m = _DATA_URL.fullmatch(url)
        if m is None:
            raise TranslationError(f"{where}: a data: image must be base64 (data:<type>;base64,...)")
        if m["mime"] not in _IMAGE_TYPES:
            raise TranslationError(f"{where}: Anthropic takes images of {', '.join(_IMAGE_TYPES)}, not {m['mime']}")
        return {"type": "image", "source": {"type": "base64", "media_type": m["mime"], "data": m["data"]}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError(f"{where}: an image url must be https://, http:// or a data: URI")


def _content_blocks(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A user or assistant message's content: a string stays a string, parts become content blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TranslationError(f"{where}: content must be a string or a list of parts")
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{where} part {i}"))
        else:
            raise TranslationError(f"{where} part {i}: a {kind!r} part cannot be sent to Anthropic "
                                   "(text and image_url parts can)")
    return blocks


def _tool_use_blocks(calls: Any, where: str) -> list[dict[str, Any]]:
    blocks = []
    for call in calls or ():
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or call.get("type", "function") != "function":
            raise TranslationError(f"{where}: only function tool calls can be translated")
        args = fn.get("arguments") or "{}"
        try:
            value = loads(args) if isinstance(args, str) else args
        except ValueError:
            raise TranslationError(f"{where}: tool call {call.get('id')!r} has arguments that are not JSON") from None
        if not isinstance(value, Mapping):
            raise TranslationError(f"{where}: tool call {call.get('id')!r} arguments must be a JSON object")
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": dict(value)})
    return blocks


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _append(messages: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    """Add a turn; consecutive turns of one role become one (tool results after each other, as Anthropic
    wants them in one user turn)."""
    if messages and messages[-1]["role"] == role:
        prev = messages[-1]
        prev["content"] = _as_blocks(prev["content"]) + _as_blocks(content)
    else:
        messages.append({"role": role, "content": content})


def _assistant(msg: Mapping[str, Any], where: str) -> str | list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if msg.get("content") not in (None, "", []):
        blocks += _as_blocks(_content_blocks(msg.get("content"), where))
    blocks += _tool_use_blocks(msg.get("tool_calls"), where)
    if not blocks:
        raise TranslationError(f"{where}: an assistant message with no content and no tool calls")
    return blocks if len(blocks) > 1 or blocks[0]["type"] != "text" else str(blocks[0]["text"])


def _turn(msg: Mapping[str, Any], role: Any, where: str) -> tuple[str, str | list[dict[str, Any]]]:
    """A user, assistant or tool message as an Anthropic turn (a tool result is a user turn)."""
    if role == "user":
        return "user", _content_blocks(msg.get("content"), where)
    if role == "assistant":
        return "assistant", _assistant(msg, where)
    if role == "tool":
        if not msg.get("tool_call_id"):
            raise TranslationError(f"{where}: a tool message needs tool_call_id")
        return "user", [{"type": "tool_result", "tool_use_id": msg["tool_call_id"],
                         "content": _content_blocks(msg.get("content") or "", where)}]
    raise TranslationError(f"{where}: role {role!r} cannot be translated (system, developer, user, assistant "
                           "and tool can)")


def _messages(raw: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """(system prompt, Anthropic messages) from OpenAI chat messages."""
    if not isinstance(raw, list) or not raw:
        raise TranslationError("body.messages must be a non-empty list")
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, Mapping) else None
        if role in ("system", "developer"):
            if out:
                raise TranslationError(f"{where}: a {role} message after the conversation started has no place in "
                                       "Anthropic's request (its system prompt comes first); move it to the start")
            system.append(_text_parts(msg.get("content"), where))
        else:
            _append(out, *_turn(msg if isinstance(msg, Mapping) else {}, role, where))
    if not out:
        raise TranslationError("body.messages has only system messages; Anthropic needs a user turn")
    return ("\n\n".join(system) if system else None), out


def _tools(raw: Any) -> list[dict[str, Any]]:
    tools = []
    for i, tool in enumerate(raw or ()):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or tool.get("type", "function") != "function" or not fn.get("name"):
            raise TranslationError(f"tools[{i}]: only function tools with a name can be translated")
        if fn["name"] == STRUCTURED_TOOL:
            raise TranslationError(f"tools[{i}]: the name {STRUCTURED_TOOL!r} is reserved for structured output")
        out: dict[str, Any] = {"name": fn["name"],
                               "input_schema": dict(fn.get("parameters") or {"type": "object", "properties": {}})}
        if fn.get("description"):
            out["description"] = fn["description"]
        tools.append(out)
    return tools


def _tool_choice(raw: Any, parallel: Any) -> dict[str, Any] | None:
    choice: dict[str, Any] | None
    if raw is None:
        choice = None
    elif raw in ("auto", "none"):
        choice = {"type": raw}
    elif raw == "required":
        choice = {"type": "any"}
    elif isinstance(raw, Mapping) and raw.get("type") == "function" and (raw.get("function") or {}).get("name"):
        choice = {"type": "tool", "name": raw["function"]["name"]}
    else:
        raise TranslationError(f"tool_choice {raw!r} cannot be translated")
    if parallel is False:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    return choice


def _schema_of(response_format: Any) -> tuple[str, dict[str, Any]] | None:
    """(name, JSON schema) of a structured ``response_format``; ``None`` for text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, Mapping):
            raise TranslationError("response_format json_schema has no schema")
        return str(spec.get("name") or "response"), dict(schema)
    raise TranslationError(f"response_format {response_format!r:.80} cannot be translated")


def _max_tokens(body: Mapping[str, Any], options: Translation) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return options.default_max_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TranslationError(f"max_tokens must be an integer >= 1, got {value!r}")
    return value


def _sampling(body: Mapping[str, Any], options: Translation, params: dict[str, Any]) -> list[str]:
    """Copy temperature/top_p where the version takes them; return the fields dropped."""
    dropped: list[str] = []
    for name in ("temperature", "top_p"):
        if body.get(name) is None:
            continue
        value = body[name]
        if options.has_sampling:
            if not isinstance(value, int | float) or not 0 <= value <= 1:
                raise TranslationError(f"{name}={value!r}: Anthropic takes 0 to 1 (OpenAI's temperature goes to 2; "
                                       "it is not rescaled)")
            params[name] = value
        elif options.sampling == "drop":
            dropped.append(name)
        else:
            raise TranslationError(f"{name} cannot be sent with anthropic-version {options.api_version} (its "
                                   "Messages API has no sampling fields); pass sampling='drop' to send the line "
                                   f"without it, or api_version='{API_VERSION_2023}'")
    for name in _SAMPLING_ONLY:
        if body.get(name) is None:
            continue
        if options.sampling != "drop":
            raise TranslationError(f"{name} has no Anthropic counterpart; pass sampling='drop' to send the line "
                                   "without it")
        dropped.append(name)
    return dropped


def _structured(body: Mapping[str, Any], options: Translation, params: dict[str, Any]) -> None:
    found = _schema_of(body.get("response_format"))
    if found is None:
        return
    name, schema = found
    if options.structured_as_tool:
        if body.get("tools"):
            raise TranslationError("response_format with tools cannot be translated for anthropic-version "
                                   f"{options.api_version} (structured output is one forced tool there)")
        params["tools"] = [{"name": STRUCTURED_TOOL, "description": f"Answer with the {name} object.",
                            "input_schema": schema}]
        params["tool_choice"] = {"type": "tool", "name": STRUCTURED_TOOL}
    else:
        params["output_config"] = {**params.get("output_config", {}),
                                   "format": {"type": "json_schema", "schema": schema}}


_HANDLED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "stop", "temperature", "top_p",
                      "tools", "tool_choice", "parallel_tool_calls", "response_format", "user", "n", "stream",
                      "reasoning_effort", "service_tier", "logprobs", "top_logprobs", *_SAMPLING_ONLY})


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    unknown = sorted(set(body) - _HANDLED - _IGNORED)
    if unknown:
        raise TranslationError(f"body field(s) {', '.join(unknown)} cannot be translated to Anthropic")
    if body.get("n") not in (None, 1):
        raise TranslationError(f"n={body['n']!r}: Anthropic answers once per request; split it into n lines")
    if body.get("stream"):
        raise TranslationError("stream=true has no meaning in a batch")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise TranslationError("logprobs: Anthropic does not return log probabilities")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise TranslationError(f"service_tier {body['service_tier']!r} has no Anthropic counterpart in a batch")


def _effort(body: Mapping[str, Any], options: Translation, params: dict[str, Any]) -> None:
    effort = body.get("reasoning_effort")
    if effort is None:
        return
    if options.api_version != API_VERSION_2026 or effort not in ("low", "medium", "high"):
        raise TranslationError(f"reasoning_effort {effort!r} cannot be translated (low, medium and high become "
                               f"output_config.effort with anthropic-version {API_VERSION_2026})")
    params["output_config"] = {**params.get("output_config", {}), "effort": effort}


def chat_to_params(body: Any, options: Translation) -> tuple[dict[str, Any], list[str]]:
    """One ``/v1/chat/completions`` body -> (Messages params, the body fields dropped under ``sampling="drop"``).

    :raises TranslationError: the body cannot be translated faithfully.
    """
    if not isinstance(body, Mapping):
        raise TranslationError("body must be a JSON object")
    _refuse_unsupported(body)
    model = body.get("model") or options.model
    if not isinstance(model, str) or not model:
        raise TranslationError("body.model is missing (set it in the line, or the operator's model)")
    system, messages = _messages(body.get("messages"))
    params: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(body, options), "messages": messages}
    if system is not None:
        params["system"] = system
    stop = body.get("stop")
    if stop is not None:
        seqs = [stop] if isinstance(stop, str) else stop
        if not isinstance(seqs, list) or not all(isinstance(s, str) and s for s in seqs):
            raise TranslationError("stop must be a string or a list of non-empty strings")
        params["stop_sequences"] = list(seqs)
    dropped = _sampling(body, options, params)
    if body.get("tools"):
        params["tools"] = _tools(body["tools"])
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        if "tools" not in params and choice["type"] not in ("none", "auto"):
            raise TranslationError("tool_choice asks for a tool but the body has no tools")
        params["tool_choice"] = choice
    _structured(body, options, params)
    _effort(body, options, params)
    if isinstance(body.get("user"), str) and body["user"]:
        params["metadata"] = {"user_id": body["user"]}
    return params, dropped


def _check_native(params: Any) -> None:
    if not isinstance(params, Mapping):
        raise TranslationError("params must be a JSON object")
    if not isinstance(params.get("model"), str) or not params["model"]:
        raise TranslationError("params.model is missing")
    value = params.get("max_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TranslationError(f"params.max_tokens must be an integer >= 1, got {value!r}")
    if not isinstance(params.get("messages"), list) or not params["messages"]:
        raise TranslationError("params.messages must be a non-empty list")


class Request(NamedTuple):
    """One translated request.

    :param custom_id: the user's id (what results and failures carry).
    :param anthropic_id: the id sent to Anthropic (:func:`anthropic_custom_id`).
    :param params: the Messages params.
    :param dropped: body fields left out under ``sampling="drop"``.
    """

    custom_id: str
    anthropic_id: str
    params: dict[str, Any]
    dropped: tuple[str, ...] = ()


def to_request(line: Mapping[str, Any], options: Translation) -> Request:
    """Translate one request line: an OpenAI batch line (``/v1/chat/completions``), or an Anthropic one
    (``{"custom_id", "params"}``), whose params pass through unchanged (a missing model filled in).

    :raises TranslationError: why the line cannot be sent.
    """
    if not isinstance(line, Mapping):
        raise TranslationError("a request line must be a JSON object")
    cid = line.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise TranslationError("custom_id must be a non-empty string")
    if "params" in line and "body" not in line:
        params = dict(line["params"]) if isinstance(line["params"], Mapping) else line["params"]
        if isinstance(params, dict) and not params.get("model") and options.model:
            params["model"] = options.model
        _check_native(params)
        return Request(cid, anthropic_custom_id(cid), params)
    url = line.get("url")
    if canonical_url(str(url)) != CHAT:
        raise TranslationError(f"url {url!r}: only chat completions ({CHAT}) can be sent to Anthropic's Messages "
                               "API")
    if line.get("method", "POST") != "POST":
        raise TranslationError(f"method {line.get('method')!r}: batch requests are POST")
    params, dropped = chat_to_params(line.get("body"), options)
    return Request(cid, anthropic_custom_id(cid), params, tuple(dropped))


@dataclass
class Translated:
    """What :func:`translate_lines` saw: counts, and the problems it will raise at the end.

    :param total: lines read.
    :param dropped: how many times each field was dropped under ``sampling="drop"``.
    :param mapped_ids: how many custom_ids broke Anthropic's rule and were mapped.
    """

    total: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    mapped_ids: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0


def _peek_id(raw: bytes) -> str | None:
    try:
        value = loads(raw)
    except ValueError:
        return None
    cid = value.get("custom_id") if isinstance(value, dict) else None
    return cid if isinstance(cid, str) else None


def translate_lines(lines: Iterable[tuple[int, bytes]], name: str, options: Translation,
                    summary: Translated | None = None, *, max_problems: int = 1000) -> Iterator[Request]:
    """Translate numbered JSONL lines, streaming; every problem is collected, and raised together once the
    lines are exhausted (:class:`InvalidRequestsError`, naming file, line and custom_id), so the caller must
    send nothing before the iteration ends.

    :param lines: ``(line number, raw line)`` pairs (:func:`~airflow_provider_synth.batch.jsonl.iter_jsonl`).
    :param name: the input's name in problems.
    :param options: the translation.
    :param summary: filled with counts as the lines go by.
    :param max_problems: problems kept for the report (all are counted).
    """
    summary = summary if summary is not None else Translated()
    seen: dict[str, str] = {}  # anthropic id -> user id (a mapped id must not meet a user's id that equals it)
    for lineno, raw in lines:
        summary.total += 1
        try:
            line = loads(raw)
        except ValueError as exc:
            _problem(summary, Problem(name, lineno, None, f"not JSON: {exc}"), max_problems)
            continue
        try:
            req = to_request(line, options)
        except TranslationError as exc:
            _problem(summary, Problem(name, lineno, _peek_id(raw), str(exc)), max_problems)
            continue
        other = seen.get(req.anthropic_id)
        if other is not None:
            why = "duplicate custom_id" if other == req.custom_id else \
                f"custom_id maps to {req.anthropic_id!r}, the id of another request ({other!r})"
            _problem(summary, Problem(name, lineno, req.custom_id, why), max_problems)
            continue
        seen[req.anthropic_id] = req.custom_id
        summary.mapped_ids += req.anthropic_id != req.custom_id
        for f in req.dropped:
            summary.dropped[f] = summary.dropped.get(f, 0) + 1
        yield req
    if summary.problem_count:
        raise InvalidRequestsError(summary.problems, summary.problem_count)


def _problem(summary: Translated, problem: Problem, max_problems: int) -> None:
    summary.problem_count += 1
    if len(summary.problems) < max_problems:
        summary.problems.append(problem)


# -- Anthropic results -> OpenAI output lines ------------------------------------------------------------------

#: An errored result's error type -> the HTTP status it stands for (what the retry table reads: 429 and 5xx
#: are retried, 4xx are final).
ERROR_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
    "timeout_error": 504, "overloaded_error": 529,
}
#: The error codes of results that never reached the model.
EXPIRED_CODE, CANCELED_CODE = "batch_expired", "batch_cancelled"


def output_line(custom_id: str, result: Mapping[str, Any]) -> bytes:
    """One Message Batches result as an output line (no newline), carrying the user's ``custom_id``:
    ``succeeded`` -> ``response.body`` is Anthropic's message as it came; ``errored`` -> the HTTP shape, the
    error's type as its code (:data:`ERROR_STATUS`); ``expired``/``canceled`` -> ``batch_expired`` /
    ``batch_cancelled``.

    :param custom_id: the user's custom_id.
    :param result: the result's ``result`` object.
    """
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message") or {}
        return success_line(custom_id, message, request_id=message.get("id"))
    if kind == "errored":
        outer: Mapping[str, Any] = result.get("error") or {}
        err: Mapping[str, Any] = outer["error"] if isinstance(outer.get("error"), Mapping) else outer
        etype = str(err.get("type") or "api_error")
        return error_line(custom_id, etype, str(err.get("message") or etype),
                          status_code=ERROR_STATUS.get(etype, 500), request_id=outer.get("request_id"))
    if kind == "expired":
        return error_line(custom_id, EXPIRED_CODE, "the batch expired (24 h) before this request was processed")
    if kind == "canceled":
        return error_line(custom_id, CANCELED_CODE, "the batch was canceled before this request was processed")
    return error_line(custom_id, "unknown_result", f"unknown result type {kind!r}")


def result_lines(results: Iterable[bytes], ids: Mapping[str, str], name: str = "results"
                 ) -> Iterator[tuple[bytes | None, str | None]]:
    """Output lines for raw Message Batches result lines, matched by custom_id in whatever order they come.

    :param results: raw JSONL lines ``{"custom_id", "result"}``.
    :param ids: Anthropic id -> the user's custom_id, for the batch's requests.
    :return: ``(output line, None)``, or ``(None, why)`` for a line that cannot be read or names an id the
        batch never had (counted by the caller; the request is then missing, so retried).
    """
    for n, raw in enumerate(results, start=1):
        try:
            line = loads(raw)
            aid, result = line["custom_id"], line["result"]
        except (ValueError, KeyError, TypeError):
            yield None, f"{name}:{n}: not a Message Batches result line: {raw[:200]!r}"
            continue
        user_id = ids.get(aid)
        if user_id is None:
            yield None, f"{name}:{n}: custom_id {aid!r} is not one of this batch's requests"
            continue
        yield output_line(user_id, result), None


# -- cost ------------------------------------------------------------------------------------------------------

#: Direct prices, USD per 1M tokens (input, cache read, output), as Anthropic published them (checked 2026-11
#: against its pricing and batch-processing pages). Cache writes cost 1.25 x input (5-minute TTL). The Message
#: Batches API bills 50% of all of these. Dated ids match by prefix; override with ``prices=``.
ANTHROPIC_PRICES: dict[str, Price] = {
    "claude-opus-4-5": Price(5.00, 0.50, 25.00),
    "claude-opus-4-1": Price(15.00, 1.50, 75.00),
    "claude-opus-4": Price(15.00, 1.50, 75.00),
    "claude-sonnet-4-5": Price(3.00, 0.30, 15.00),
    "claude-sonnet-4": Price(3.00, 0.30, 15.00),
    "claude-3-7-sonnet": Price(3.00, 0.30, 15.00),
    "claude-haiku-4-5": Price(1.00, 0.10, 5.00),
    "claude-3-5-haiku": Price(0.80, 0.08, 4.00),
    "claude-3-haiku": Price(0.25, 0.03, 1.25),
}
#: A cache write's price over the input price.
CACHE_WRITE_FACTOR = 1.25


def anthropic_cost(usage: Usage, cache_creation_tokens: int, model: str | None,
                   prices: Mapping[str, Price | tuple[float, float, float]] | None = None, *,
                   batch: bool = True) -> float | None:
    """What Claude usage cost: ``usage`` as :func:`~airflow_provider_synth.batch.usage.cost_usd` prices it
    (``prompt_tokens`` holding every input token, ``cached_tokens`` the cache reads), plus the cache-write
    premium on ``cache_creation_tokens``; half of it in a batch. ``None`` for a model with no price.

    :param prices: model -> (input, cache read, output) per 1M tokens, over :data:`ANTHROPIC_PRICES`.
    """
    table: dict[str, Price | tuple[float, float, float]] = {**ANTHROPIC_PRICES, **(prices or {})}
    base = cost_usd(usage, model, table, batch=batch)
    if base is None:
        return None
    from airflow_provider_synth.batch.usage import price_for

    price = price_for(model, table)
    assert price is not None
    premium = cache_creation_tokens * price.input * (CACHE_WRITE_FACTOR - 1) / 1_000_000
    return round(base + premium * (0.5 if batch else 1.0), 6)


def cache_creation_tokens(body: Mapping[str, Any] | None) -> int:
    """``usage.cache_creation_input_tokens`` of one Anthropic message (0 when absent)."""
    usage = (body or {}).get("usage") or {}
    return int(usage.get("cache_creation_input_tokens") or 0)


def request_bytes(req: Request) -> int:
    """The bytes one request adds to a create call's body (``{"custom_id", "params"}`` and a comma)."""
    return len(dumps({"custom_id": req.anthropic_id, "params": req.params})) + 1


def requests_payload(reqs: Sequence[Request]) -> list[dict[str, Any]]:
    """The ``requests`` of a create call."""
    return [{"custom_id": r.anthropic_id, "params": r.params} for r in reqs]
