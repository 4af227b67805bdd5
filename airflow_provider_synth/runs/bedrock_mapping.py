"""OpenAI batch lines <-> Amazon Bedrock batch records, per model family; Bedrock's limits; Bedrock's prices.

A Bedrock batch job reads ``{"recordId", "modelInput"}`` lines, ``modelInput`` being the model's native
``InvokeModel`` body, and writes ``{"recordId", "modelInput", "modelOutput" | "error"}`` lines. This module turns
one OpenAI request body into the family's ``modelInput`` (or says why the family cannot take it), and one
Bedrock output record into an OpenAI output line, so that the core merges, checks and accounts Bedrock's
answers exactly as it does every other backend's.

Pure: no Airflow, no boto3; the run and the local stand-in both import it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_synth.batch.requests import CHAT, EMBEDDINGS
from airflow_provider_synth.batch.results import error_line, success_line
from airflow_provider_synth.batch.usage import Price
from airflow_provider_synth.runs.anthropic_messages import (
    API_VERSION_2023,
    Translation,
    TranslationError,
    chat_to_params,
)

#: ``anthropic_version`` of every Claude body on Bedrock (the Messages API as Bedrock serves it).
ANTHROPIC_VERSION = "bedrock-2023-05-31"
#: Geographic and global cross-region inference profiles prefix the model id: ``us.anthropic.claude-...``.
_PROFILE_PREFIX = re.compile(r"^(?:us|eu|apac|us-gov|ca|jp|au|global)\.")
#: Bedrock's recordId: 11 alphanumeric characters.
RECORD_ID_RE = re.compile(r"^[A-Za-z0-9]{11}$")

#: The OpenAI sampling fields every chat family maps (others are refused unless listed as ignored).
_IGNORED = frozenset({"model", "user", "metadata", "store", "service_tier", "seed", "parallel_tool_calls",
                      "stream_options"})


class Unsupported(ValueError):
    """What a model family cannot take from an OpenAI request, in words a user can act on."""


def base_model_id(model_id: str) -> str:
    """The foundation model a model id, inference profile id or ARN names: ``us.meta.llama3-...`` ->
    ``meta.llama3-...``; ``arn:aws:bedrock:...:inference-profile/us.anthropic.claude-...`` -> ``anthropic...``."""
    name = model_id.rsplit("/", 1)[-1] if model_id.startswith("arn:") else model_id
    return _PROFILE_PREFIX.sub("", name)


def record_id(index: int) -> str:
    """The recordId of a job file's ``index``-th record (0-based): ``R`` and 10 digits, as Bedrock requires."""
    return f"R{index:010d}"


def record_index(rid: str) -> int | None:
    """The index :func:`record_id` encoded, or ``None`` for a recordId this provider did not write."""
    if len(rid) == 11 and rid[0] == "R" and rid[1:].isdigit():
        return int(rid[1:])
    return None


# -- OpenAI chat -> native bodies ------------------------------------------------------------------------------


def _text(content: Any, family: str) -> str:
    """A message's content as plain text; images and audio are refused (the text families cannot see them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text":
                raise Unsupported(f"{family} takes text only; a content part of type {kind!r} cannot be sent")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise Unsupported(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def _turns(body: Mapping[str, Any], family: str, *, tools: bool = False) -> tuple[str, list[tuple[str, str]]]:
    """(system text, [(role, text)...]) of a chat body; system and developer messages join the system text."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for message in body.get("messages") or []:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text(message.get("content"), family))
        elif role in ("user", "assistant"):
            if message.get("tool_calls") and not tools:
                raise Unsupported(f"{family} takes no tool calls (an assistant message holds tool_calls)")
            turns.append((role, _text(message.get("content"), family)))
        else:
            raise Unsupported(f"{family} takes no {role!r} messages (tool results need a model with tools)")
    if not turns or turns[0][0] != "user":
        raise Unsupported(f"{family} needs the first non-system message to be from the user")
    return "\n\n".join(s for s in system if s), turns


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return int(value) if value is not None else default


def _stops(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [str(s) for s in stop]


def _refuse_extras(body: Mapping[str, Any], family: str, mapped: frozenset[str]) -> None:
    """Refuse every field the family has no place for, rather than drop it silently."""
    extra = sorted(k for k, v in body.items() if k not in mapped and k not in _IGNORED and v is not None)
    if body.get("n") not in (None, 1):
        raise Unsupported(f"{family} answers once per record: n={body['n']!r} cannot be sent")
    extra = [k for k in extra if k != "n"]
    if extra:
        raise Unsupported(f"{family} has no equivalent of {', '.join(extra)}")


_LLAMA_MAPPED = frozenset({"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream"})


def llama_input(body: Mapping[str, Any]) -> dict[str, Any]:
    """Meta Llama 3.x: the chat rendered with Llama 3's prompt template, ``max_gen_len``, ``temperature``,
    ``top_p``. No tools, no stop sequences (Bedrock's Llama body has none)."""
    _refuse_extras(body, "Meta Llama", _LLAMA_MAPPED)
    system, turns = _turns(body, "Meta Llama")
    prompt = ["<|begin_of_text|>"]
    if system:
        prompt.append(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
    for role, text in turns:
        prompt.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")
    prompt.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    out: dict[str, Any] = {"prompt": "".join(prompt), "max_gen_len": _max_tokens(body, 512)}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p")):
        if body.get(src) is not None:
            out[dst] = body[src]
    return out


_MISTRAL_MAPPED = frozenset({"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                             "stream"})


def mistral_input(body: Mapping[str, Any]) -> dict[str, Any]:
    """Mistral (7B, Mixtral, Large, Small): the chat in Mistral's ``[INST]`` template, ``max_tokens``,
    ``temperature``, ``top_p``, ``stop``. The system text opens the first user turn (Mistral has no system
    role)."""
    _refuse_extras(body, "Mistral", _MISTRAL_MAPPED)
    system, turns = _turns(body, "Mistral")
    prompt = "<s>"
    for i, (role, text) in enumerate(turns):
        if role == "user":
            text = f"{system}\n\n{text}" if i == 0 and system else text
            prompt += f"[INST] {text} [/INST]"
        else:
            prompt += f" {text}</s>"
    out: dict[str, Any] = {"prompt": prompt, "max_tokens": _max_tokens(body, 512)}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if _stops(body):
        out["stop"] = _stops(body)
    return out


_NOVA_MAPPED = frozenset({"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                          "stream", "tools", "tool_choice"})


def _nova_tools(body: Mapping[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools")
    if not tools:
        return None
    specs = []
    for tool in tools:
        fn = tool.get("function") if tool.get("type") == "function" else None
        if not fn or not fn.get("name"):
            raise Unsupported("Amazon Nova takes function tools only ({'type': 'function', 'function': {...}})")
        specs.append({"toolSpec": {"name": fn["name"], "description": fn.get("description") or fn["name"],
                                   "inputSchema": {"json": fn.get("parameters") or {"type": "object"}}}})
    config: dict[str, Any] = {"tools": specs}
    choice = body.get("tool_choice")
    if choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, Mapping) and choice.get("function"):
        config["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
    elif choice not in (None, "auto"):
        raise Unsupported(f"Amazon Nova has no tool_choice {choice!r}")
    return config


def nova_input(body: Mapping[str, Any]) -> dict[str, Any]:
    """Amazon Nova (Micro, Lite, Pro, Premier): ``messages-v1`` with ``system``, ``inferenceConfig``
    (``maxTokens``, ``temperature``, ``topP``, ``stopSequences``) and, for function tools, ``toolConfig``."""
    _refuse_extras(body, "Amazon Nova", _NOVA_MAPPED)
    system, turns = _turns(body, "Amazon Nova")
    out: dict[str, Any] = {
        "schemaVersion": "messages-v1",
        "messages": [{"role": role, "content": [{"text": text}]} for role, text in turns],
    }
    if system:
        out["system"] = [{"text": system}]
    config: dict[str, Any] = {"maxTokens": _max_tokens(body, 512)}
    for src, dst in (("temperature", "temperature"), ("top_p", "topP")):
        if body.get(src) is not None:
            config[dst] = body[src]
    if _stops(body):
        config["stopSequences"] = _stops(body)
    out["inferenceConfig"] = config
    tools = _nova_tools(body)
    if tools is not None:
        out["toolConfig"] = tools
    return out


_TITAN_MAPPED = frozenset({"input", "dimensions", "encoding_format"})


def titan_embedding_input(body: Mapping[str, Any]) -> dict[str, Any]:
    """Amazon Titan Text Embeddings (v1, v2): one ``inputText`` per record, ``dimensions`` (v2)."""
    _refuse_extras(body, "Amazon Titan embeddings", _TITAN_MAPPED)
    value = body.get("input")
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise Unsupported("Amazon Titan embeddings take one text per record: split an input list into one "
                              "request per text")
        value = value[0]
    if not isinstance(value, str):
        raise Unsupported("Amazon Titan embeddings take text, not token ids")
    if body.get("encoding_format") not in (None, "float"):
        raise Unsupported("Amazon Titan embeddings return floats only (encoding_format='float')")
    out: dict[str, Any] = {"inputText": value}
    if body.get("dimensions") is not None:
        out["dimensions"] = int(body["dimensions"])
    return out


#: Claude on Bedrock speaks the Messages API of ``anthropic-version: 2023-06-01`` (it takes ``temperature`` and
#: ``top_p``; structured output goes as one forced tool), named ``bedrock-2023-05-31`` in the body.
_CLAUDE = Translation(api_version=API_VERSION_2023)


def claude_input(body: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic Claude: the Anthropic backend's own translation (:mod:`~airflow_provider_synth.runs.
    anthropic_messages`), without ``model`` (the job names it) and ``metadata`` (Bedrock's body has none),
    with ``anthropic_version: bedrock-2023-05-31``."""
    try:
        params, _ = chat_to_params({**body, "model": body.get("model") or "bedrock"}, _CLAUDE)
    except TranslationError as exc:
        raise Unsupported(f"Anthropic Claude: {exc}") from None
    params.pop("model", None)
    params.pop("metadata", None)
    return {"anthropic_version": ANTHROPIC_VERSION, **params}


# -- native outputs -> OpenAI bodies ---------------------------------------------------------------------------

_FINISH = {"stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "length": "length",
           "max_tokens": "length", "tool_use": "tool_calls", "content_filtered": "content_filter",
           "guardrail_intervened": "content_filter", "refusal": "content_filter"}


def _chat_body(rid: str, model: str, text: str | None, finish: str | None, prompt: int | None,
               completion: int | None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    body: dict[str, Any] = {
        "id": f"bedrock-{rid}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": _FINISH.get(str(finish), finish or "stop")}],
    }
    if prompt is not None or completion is not None:
        body["usage"] = {"prompt_tokens": prompt or 0, "completion_tokens": completion or 0,
                         "total_tokens": (prompt or 0) + (completion or 0)}
    return body


def claude_output(rid: str, model: str, out: Mapping[str, Any]) -> dict[str, Any]:
    """Claude's message as it came, as the Anthropic backend lands it (the core reads its text, tool calls,
    ``stop_reason`` and usage)."""
    if out.get("type") != "message" or not isinstance(out.get("content"), list):
        raise ValueError("not an Anthropic message")
    return dict(out)


def llama_output(rid: str, model: str, out: Mapping[str, Any]) -> dict[str, Any]:
    return _chat_body(rid, model, str(out.get("generation", "")), out.get("stop_reason"),
                      out.get("prompt_token_count"), out.get("generation_token_count"))


def mistral_output(rid: str, model: str, out: Mapping[str, Any]) -> dict[str, Any]:
    """Mistral's native body reports no token counts: the run takes them from the job's manifest."""
    first = (out.get("outputs") or [{}])[0]
    return _chat_body(rid, model, str(first.get("text", "")), first.get("stop_reason"), None, None)


def nova_output(rid: str, model: str, out: Mapping[str, Any]) -> dict[str, Any]:
    content = ((out.get("output") or {}).get("message") or {}).get("content") or []
    texts = [str(c["text"]) for c in content if "text" in c]
    calls = [{"id": c["toolUse"].get("toolUseId") or f"call_{i}", "type": "function",
              "function": {"name": c["toolUse"]["name"], "arguments": json.dumps(c["toolUse"].get("input") or {})}}
             for i, c in enumerate(content) if "toolUse" in c]
    usage = out.get("usage") or {}
    return _chat_body(rid, model, "".join(texts) if texts else None, out.get("stopReason"),
                      usage.get("inputTokens"), usage.get("outputTokens"), calls)


def titan_embedding_output(rid: str, model: str, out: Mapping[str, Any]) -> dict[str, Any]:
    tokens = int(out.get("inputTextTokenCount") or 0)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": list(out.get("embedding") or [])}],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# -- families --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A model family: which model ids it covers, which endpoint it serves, and its two translations.

    :param name: its name in messages and docs.
    :param prefixes: base model id prefixes (:func:`base_model_id`).
    :param endpoint: the OpenAI endpoint it takes.
    :param to_input: OpenAI body -> ``modelInput`` (raises :class:`Unsupported`).
    :param to_body: (recordId, model, ``modelOutput``) -> the OpenAI response body.
    :param per_record_usage: its output reports token counts per record (else: the job manifest's totals).
    """

    name: str
    prefixes: tuple[str, ...]
    endpoint: str
    to_input: Callable[[Mapping[str, Any]], dict[str, Any]]
    to_body: Callable[[str, str, Mapping[str, Any]], dict[str, Any]]
    per_record_usage: bool = True


FAMILIES: list[Family] = [
    Family("Anthropic Claude", ("anthropic.claude",), CHAT, claude_input, claude_output),
    Family("Meta Llama", ("meta.llama3",), CHAT, llama_input, llama_output),
    Family("Mistral", ("mistral.",), CHAT, mistral_input, mistral_output, per_record_usage=False),
    Family("Amazon Nova", ("amazon.nova-",), CHAT, nova_input, nova_output),
    Family("Amazon Titan embeddings", ("amazon.titan-embed-text",), EMBEDDINGS, titan_embedding_input,
           titan_embedding_output),
]


def family_of(model_id: str) -> Family:
    """The family of a model id (or inference profile id or ARN).

    :raises Unsupported: for a model no family covers, naming the families that are.
    """
    base = base_model_id(model_id)
    for family in FAMILIES:
        if base.startswith(family.prefixes):
            return family
    known = "; ".join(f"{f.name} ({', '.join(p + '*' for p in f.prefixes)})" for f in FAMILIES)
    raise Unsupported(f"no Bedrock batch translation for model {model_id!r}; families: {known}")


def to_record(family: Family, rid: str, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """One Bedrock input record for one OpenAI request.

    :raises Unsupported: the family cannot take the request (its endpoint or a field).
    """
    if endpoint != family.endpoint:
        raise Unsupported(f"{family.name} serves {family.endpoint} in a batch job, not {endpoint}")
    return {"recordId": rid, "modelInput": family.to_input(body)}


def output_line(family: Family, custom_id: str, model: str, record: Mapping[str, Any]) -> bytes:
    """The OpenAI output (or error) line of one Bedrock output record.

    A record's ``error`` keeps its HTTP status (``errorCode``) so the core's one retry table decides: 429 and
    5xx are retried in a later round, 400 (a body the model refused) is final.
    """
    rid = str(record.get("recordId"))
    error = record.get("error")
    output = record.get("modelOutput")
    if error is not None or not isinstance(output, Mapping):
        error = error if isinstance(error, Mapping) else {"errorMessage": str(error or "no modelOutput")}
        status = error.get("errorCode")
        status = int(status) if isinstance(status, int | str) and str(status).isdigit() else 500
        message = str(error.get("errorMessage") or error.get("message") or "record failed")
        return error_line(custom_id, _error_code(status), message, status_code=status)
    try:
        body = family.to_body(rid, model, output)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        return error_line(custom_id, "unreadable_output", f"{family.name} output not understood: {exc!r}",
                          status_code=502)
    return success_line(custom_id, body, request_id=rid)


def _error_code(status: int) -> str:
    if status == 429:
        return "rate_limit_exceeded"
    if status >= 500:
        return "server_error"
    return "invalid_request" if status == 400 else f"http_{status}"


# -- limits ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BedrockLimits:
    """Bedrock's batch inference quotas (Service Quotas, per account, region and model; adjustable). The
    defaults are AWS's defaults for most models: raise them here when your account's quotas are higher.

    :param min_records: records a job must hold at least ("Minimum number of records per batch inference job").
    :param max_records: records per job ("Records per batch inference job").
    :param max_file_bytes: bytes per input file ("Batch inference input file size").
    :param max_record_bytes: bytes per record line (a record over this fails Bedrock's validation).
    """

    min_records: int = 100
    max_records: int = 50_000
    max_file_bytes: int = 1_000_000_000
    max_record_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("min_records", "max_records", "max_file_bytes", "max_record_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_records < 2 * self.min_records:
            raise ValueError(f"max_records ({self.max_records}) must be at least twice min_records "
                             f"({self.min_records}), so every split job can hold the minimum")


def plan_jobs(total: int, total_bytes: int, limits: BedrockLimits) -> int:
    """How many jobs ``total`` records of ``total_bytes`` need: as few as the limits allow, each holding at
    least ``min_records`` (records are spread evenly, see :func:`job_sizes`)."""
    jobs = max(1, -(-total // limits.max_records), -(-total_bytes // limits.max_file_bytes))
    most = max(1, total // limits.min_records)
    if jobs > most:
        raise Unsupported(f"{total} records of {total_bytes:,} bytes need {jobs} jobs to keep each file under "
                          f"{limits.max_file_bytes:,} bytes, but {jobs} jobs cannot each hold the minimum of "
                          f"{limits.min_records} records: send fewer, smaller or more requests")
    return jobs


def job_sizes(total: int, jobs: int) -> list[int]:
    """``total`` records spread evenly over ``jobs`` jobs, first ones one larger."""
    size, extra = divmod(total, jobs)
    return [size + (1 if i < extra else 0) for i in range(jobs)]


# -- prices ----------------------------------------------------------------------------------------------------

#: On-demand prices in USD per 1M tokens (input, cached input, output) in us-east-1, from AWS's Bedrock pricing
#: page as last known to this project (not re-checked from this offline machine: verify yours); batch inference
#: bills half of them. Cross-region profile ids
#: (``us.``, ``eu.``...) are priced as their model. Override per run with ``prices=``.
BEDROCK_PRICES: dict[str, Price] = {
    "anthropic.claude-3-haiku-20240307-v1:0": Price(0.25, 0.03, 1.25),
    "anthropic.claude-3-5-haiku-20241022-v1:0": Price(0.80, 0.08, 4.00),
    "anthropic.claude-haiku-4-5-20251001-v1:0": Price(1.00, 0.10, 5.00),
    "anthropic.claude-3-5-sonnet-20240620-v1:0": Price(3.00, 0.30, 15.00),
    "anthropic.claude-3-5-sonnet-20241022-v2:0": Price(3.00, 0.30, 15.00),
    "anthropic.claude-3-7-sonnet-20250219-v1:0": Price(3.00, 0.30, 15.00),
    "anthropic.claude-sonnet-4-20250514-v1:0": Price(3.00, 0.30, 15.00),
    "anthropic.claude-sonnet-4-5-20250929-v1:0": Price(3.00, 0.30, 15.00),
    "anthropic.claude-opus-4-1-20250805-v1:0": Price(15.00, 1.50, 75.00),
    "meta.llama3-1-8b-instruct-v1:0": Price(0.22, 0.22, 0.22),
    "meta.llama3-1-70b-instruct-v1:0": Price(0.72, 0.72, 0.72),
    "meta.llama3-1-405b-instruct-v1:0": Price(2.40, 2.40, 2.40),
    "meta.llama3-3-70b-instruct-v1:0": Price(0.72, 0.72, 0.72),
    "mistral.mistral-7b-instruct-v0:2": Price(0.15, 0.15, 0.20),
    "mistral.mixtral-8x7b-instruct-v0:1": Price(0.45, 0.45, 0.70),
    "mistral.mistral-small-2402-v1:0": Price(1.00, 1.00, 3.00),
    "mistral.mistral-large-2402-v1:0": Price(4.00, 4.00, 12.00),
    "mistral.mistral-large-2407-v1:0": Price(2.00, 2.00, 6.00),
    "amazon.nova-micro-v1:0": Price(0.035, 0.00875, 0.14),
    "amazon.nova-lite-v1:0": Price(0.06, 0.015, 0.24),
    "amazon.nova-pro-v1:0": Price(0.80, 0.20, 3.20),
    "amazon.nova-premier-v1:0": Price(2.50, 0.625, 12.50),
    "amazon.titan-embed-text-v1": Price(0.10, 0.10, 0.0),
    "amazon.titan-embed-text-v2:0": Price(0.02, 0.02, 0.0),
}


def prices_for(model_id: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Price]:
    """The price table for a run on ``model_id``: Bedrock's list, the overrides on top, and the run's own model
    id (a profile id or ARN) priced as its base model."""
    table: dict[str, Price] = dict(BEDROCK_PRICES)
    table.update({k: Price(*v) for k, v in (overrides or {}).items()})
    base = base_model_id(model_id)
    if model_id not in table and base in table:
        table[model_id] = table[base]
    return table
