"""Deterministic stand-in answers for batch requests, shaped like the real OpenAI response bodies.

The same request always gets the same answer and the same usage, so tests can assert on them. Structured
answers (``response_format`` with a JSON schema, forced tool calls) are drawn by hypothesis-jsonschema, so they
satisfy the schema's constraints (bounds, lengths, patterns, enums, required, nested objects and arrays). Input
tokens are counted as the service bills them, with the provider's own counter
(:func:`~airflow_provider_synth.batch.usage.estimate_request_tokens`: message overhead, tools, the schema), so a
cost rehearsed here is the cost a client's tiktoken count predicts.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import logging
import struct
import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

from airflow_provider_synth import _compat
from airflow_provider_synth.batch.usage import count_text_tokens, estimate_request_tokens

log = logging.getLogger(__name__)

_WORDS = (
    "the quick data pipeline synthesizes clear answers from every record while batches wait quietly "
    "in object storage and the triggerer polls without blocking its loop so that results land in "
    "input order with failures counted and costs estimated before anything is paid for"
).split()

_EMBEDDING_DIMENSIONS = {"text-embedding-3-large": 3072}
_DEFAULT_EMBEDDING_DIMENSIONS = 1536


def digest(*parts: Any) -> bytes:
    """A stable hash of JSON-serialisable parts."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).digest()


def input_tokens(body: dict[str, Any]) -> int:
    """Input tokens of a request body as the service bills them (and counts them against enqueued-token
    limits): the provider's own count, messages with their overhead, tools and the response schema."""
    return estimate_request_tokens(body)


def answer_text(seed: bytes, min_words: int = 6, max_words: int = 40) -> str:
    """A sentence of ``min_words``..``max_words`` words picked by ``seed``."""
    rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
    n = int(rng.integers(min_words, max_words + 1))
    words = [_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), n)]
    return f"Synthetic answer {seed.hex()[:8]}: " + " ".join(words) + "."


#: Schema-valid values drawn per schema, in one Hypothesis run; each request's answer is one of them.
POOL_SIZE = 32


#: Characters ``str.splitlines`` splits on that JSON leaves unescaped: a client reading the output file as text
#: would see a broken line (JSON escapes the others, below U+0020).
_LINE_BREAKS = tuple(c.encode() for c in "\x85\u2028\u2029")


def _no_extra_keys(node: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object schema leaves it open: a model answers
    the keys it was asked for (a pydantic model without ``strict`` leaves them open), not random extra ones. The
    values still fit the schema as written."""
    if isinstance(node, list):
        return [_no_extra_keys(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _no_extra_keys(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=128)
def _schema_values(schema_json: bytes) -> tuple[Any, ...]:
    """Values valid for the schema, drawn by hypothesis-jsonschema; the same ones in every process (the run is
    seeded by the schema). Empty for a schema no value satisfies (or one the library cannot generate for)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    try:
        strategy = _compat.jsonschema_strategy(_no_extra_keys(orjson.loads(schema_json)))
    except Exception as exc:  # an invalid or unsupported schema: the answer is null, and the checks say so
        log.warning("no value can be generated for the JSON schema %.200s: %s", schema_json.decode(), exc)
        return ()
    found: list[Any] = []

    def keep(value: Any) -> None:
        try:
            text = orjson.dumps(value)  # integers past 64 bits: valid JSON that no client's parser takes
        except orjson.JSONEncodeError:
            return
        if not any(sep in text for sep in _LINE_BREAKS):
            found.append(value)

    run: Any = given(strategy)(keep)  # type: ignore[no-untyped-call]
    run = settings(database=None, max_examples=POOL_SIZE, phases=[Phase.generate], deadline=None,
                   suppress_health_check=list(HealthCheck), print_blob=False)(run)
    try:
        hypothesis_seed(int.from_bytes(hashlib.sha256(schema_json).digest()[:8], "little"))(run)()
    except Exception as exc:
        log.warning("generating values for the JSON schema %.200s failed: %s", schema_json.decode(), exc)
    unique = {orjson.dumps(v, option=orjson.OPT_SORT_KEYS): v for v in found}
    return tuple(unique.values())


def _plain_text(schema: Mapping[str, Any], seed: bytes) -> str | None:
    """Readable words for a string schema that asks nothing but a length, fitted to it; ``None`` otherwise."""
    if schema.get("type") != "string" or any(k in schema for k in ("pattern", "format", "enum", "const")):
        return None
    low, high = int(schema.get("minLength", 0)), int(schema.get("maxLength", 200))
    text = " ".join(answer_text(seed, 3, 12).split()[3:])
    text = (text + " " + text * (low // max(len(text), 1) + 1))[:high].rstrip() if len(text) < low else text
    return text[:high].rstrip() if len(text[:high].rstrip()) >= low else text[:high]


def _readable(value: Any, schema: Any, root: Mapping[str, Any], seed: bytes, depth: int = 0) -> Any:
    """``value`` with its free-text strings as words instead of arbitrary code points (same lengths' bounds)."""
    if not isinstance(schema, Mapping) or depth > 12:
        return value
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return _readable(value, target, root, seed, depth + 1)
    branches = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(branches, list):  # Optional[str] and unions: the branch of the value's own JSON type
        kinds: dict[type, str] = {str: "string", dict: "object", list: "array"}
        kind = kinds.get(type(value))
        branch = next((b for b in branches if isinstance(b, Mapping) and (b.get("type") == kind or "$ref" in b)),
                      None)
        return _readable(value, branch, root, seed, depth + 1) if kind and branch else value
    if isinstance(value, str):
        return _plain_text(schema, seed) or value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        return {k: _readable(v, props.get(k), root, digest(seed.hex(), k), depth + 1) for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_readable(v, schema["items"], root, digest(seed.hex(), i), depth + 1) for i, v in enumerate(value)]
    return value


def instance_of(schema: Any, seed: bytes) -> Any:
    """A value valid for the JSON ``schema``, picked by ``seed`` among the values hypothesis-jsonschema drew for
    it (free text as words where that keeps it valid); ``None`` when no value satisfies the schema."""
    if not isinstance(schema, Mapping):
        return None
    values = _answers_for(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
    return copy.deepcopy(values[int.from_bytes(seed[:8], "little") % len(values)]) if values else None


@lru_cache(maxsize=128)
def _answers_for(schema_json: bytes) -> tuple[Any, ...]:
    """The schema's values with readable free text, each checked against the schema (once per schema)."""
    import jsonschema

    schema = orjson.loads(schema_json)
    validator = jsonschema.validators.validator_for(schema)(schema)
    out = []
    for index, value in enumerate(_schema_values(schema_json)):
        readable = _readable(value, schema, schema, digest(schema_json.hex(), index))
        out.append(readable if readable == value or validator.is_valid(readable) else value)
    return tuple(out)


def _usage(prompt: int, completion_text: str, model: str) -> dict[str, Any]:
    completion = count_text_tokens(completion_text, model)
    # Caching applies to prompts of 1,024 tokens and more, in steps of 128.
    cached = (prompt // 2) // 128 * 128 if prompt >= 1024 else 0
    reasoning = completion if model.startswith(("o1", "o3", "o4", "gpt-5")) else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion + reasoning,
        "total_tokens": prompt + completion + reasoning,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _forced_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function a chat request makes the model call, if it forces one."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice")
    if not tools or choice in (None, "none", "auto"):
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return next((t["function"] for t in tools if t["function"].get("name") == name), None)
    return dict(tools[0]["function"])


def _cut(text: str, limit: int, model: str) -> str:
    """``text`` cut to at most ``limit`` tokens (an answer that hit ``max_completion_tokens``)."""
    text = text[: limit * 4]
    while text and count_text_tokens(text, model) > limit:
        text = text[: int(len(text) * 0.9)]
    return text


def _chat_message(body: dict[str, Any], seed: bytes, content: str | None) -> tuple[dict[str, Any], str, str]:
    tool = _forced_tool(body) if content is None else None
    if tool is not None:
        args = orjson.dumps(instance_of(tool.get("parameters", {}), seed)).decode()
        call = {"id": "call_" + seed.hex()[:24], "type": "function", "function": {"name": tool["name"], "arguments": args}}
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
        return message, "tool_calls", args
    fmt = body.get("response_format") or {}
    if content is None and fmt.get("type") == "json_schema":
        content = orjson.dumps(instance_of((fmt.get("json_schema") or {}).get("schema", {}), seed)).decode()
    elif content is None and fmt.get("type") == "json_object":
        content = orjson.dumps({"answer": answer_text(seed)}).decode()
    text = content if content is not None else answer_text(seed)
    finish = "stop"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    model = str(body.get("model", ""))
    if isinstance(limit, int) and count_text_tokens(text, model) > limit:
        text, finish = _cut(text, limit, model), "length"
    return {"role": "assistant", "content": text, "refusal": None, "annotations": []}, finish, text


def chat_completion(body: dict[str, Any], custom_id: str, content: str | None = None) -> dict[str, Any]:
    """A ``chat.completion`` body for a ``/v1/chat/completions`` request."""
    model = str(body.get("model", "gpt-4o-mini"))
    messages = body.get("messages") or []
    choices, completion = [], []
    for index in range(int(body.get("n") or 1)):
        seed = digest(custom_id, messages, index)
        message, finish, text = _chat_message(body, seed, content)
        completion.append(text)
        choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
    return {
        "id": "chatcmpl-" + digest(custom_id, messages).hex()[:29],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(input_tokens(body), "".join(completion), model),
        "service_tier": "default",
        "system_fingerprint": "fp_synth_local",
    }


def _embedding_inputs(value: Any) -> list[Any]:
    """One item per embedding: a string, a token list, or a list of either."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return list(value)
    return [value]


def embedding_vector(value: Any, model: str, dimensions: int | None) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A deterministic unit vector for one input."""
    dims = dimensions or _EMBEDDING_DIMENSIONS.get(model, _DEFAULT_EMBEDDING_DIMENSIONS)
    rng = np.random.default_rng(int.from_bytes(digest(model, value)[:8], "little"))
    vector = rng.standard_normal(dims).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return vector


def embeddings(body: dict[str, Any], custom_id: str) -> dict[str, Any]:
    """A ``list`` of ``embedding`` objects for a ``/v1/embeddings`` request."""
    model = str(body.get("model", "text-embedding-3-small"))
    items = _embedding_inputs(body.get("input", ""))
    b64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(items):
        vector = embedding_vector(item, model, body.get("dimensions"))
        emb: Any = base64.b64encode(vector.tobytes()).decode() if b64 else [float(x) for x in vector]
        data.append({"object": "embedding", "index": index, "embedding": emb})
    prompt = sum(len(i) if isinstance(i, list) else count_text_tokens(str(i), model) for i in items)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def responses(body: dict[str, Any], custom_id: str, content: str | None = None) -> dict[str, Any]:
    """A ``response`` body for a ``/v1/responses`` request."""
    model = str(body.get("model", "gpt-4o-mini"))
    seed = digest(custom_id, body.get("input"), body.get("instructions"))
    text = content if content is not None else answer_text(seed)
    usage = _usage(input_tokens(body), text, model)
    return {
        "id": "resp_" + seed.hex()[:32],
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_" + seed.hex()[32:64],
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata") or {},
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {
                "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                "cache_write_tokens": 0,
            },
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": usage["total_tokens"],
        },
    }


def completions(body: dict[str, Any], custom_id: str, content: str | None = None) -> dict[str, Any]:
    """A ``text_completion`` body for a ``/v1/completions`` request."""
    model = str(body.get("model", "gpt-3.5-turbo-instruct"))
    prompt = body.get("prompt", "")
    seed = digest(custom_id, prompt)
    text = content if content is not None else " " + answer_text(seed)
    usage = _usage(input_tokens(body), text, model)
    return {
        "id": "cmpl-" + seed.hex()[:29],
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    }


def answer(url: str, body: dict[str, Any], custom_id: str, content: str | None = None) -> dict[str, Any]:
    """The success body for a request to ``url`` (``/v1/chat/completions``, ``/chat/completions``, ...)."""
    path = url.removeprefix("/v1")
    if path == "/embeddings":
        return embeddings(body, custom_id)
    if path == "/moderations":
        from airflow_provider_synth.server.moderations import moderation

        return moderation(body, custom_id)
    if path == "/responses":
        return responses(body, custom_id, content)
    if path == "/completions":
        return completions(body, custom_id, content)
    return chat_completion(body, custom_id, content)


def _shape_choice(choice: dict[str, Any], finish_reason: str | None, refusal: str | None) -> None:
    msg = choice.get("message")
    holder, key = (msg, "content") if msg is not None else (choice, "text")
    text = holder.get(key)
    if refusal is not None and msg is not None:
        msg["content"], msg["refusal"] = None, refusal
    elif finish_reason == "length" and isinstance(text, str):
        holder[key] = text[: len(text) // 2]
    elif finish_reason == "content_filter":
        holder[key] = None if msg is not None else ""
    if finish_reason is not None:
        choice["finish_reason"] = finish_reason


def _shape_response(body: dict[str, Any], finish_reason: str | None, refusal: str | None) -> None:
    for item in body.get("output") or ():
        if refusal is not None:
            item["content"] = [{"type": "refusal", "refusal": refusal}]
        elif finish_reason == "length":
            for part in item.get("content") or ():
                if isinstance(part.get("text"), str):
                    part["text"] = part["text"][: len(part["text"]) // 2]
    if finish_reason is not None:
        reason = {"length": "max_output_tokens"}.get(finish_reason, finish_reason)
        body["status"], body["incomplete_details"] = "incomplete", {"reason": reason}


def shape_answer(body: dict[str, Any], finish_reason: str | None = None, refusal: str | None = None) -> None:
    """Make a success body cut off (``finish_reason="length"``: half of the text), filtered
    (``"content_filter"``: no text) or refused (``refusal``), as an outcome asks; in place."""
    if finish_reason is None and refusal is None:
        return
    for choice in body.get("choices") or ():
        _shape_choice(choice, finish_reason, refusal)
    if body.get("object") == "response":
        _shape_response(body, finish_reason, refusal)


def usage_of(body: dict[str, Any]) -> tuple[int, int, int, int]:
    """``(input, cached, output, reasoning)`` tokens of a success body, for the batch's ``usage``."""
    usage = body.get("usage") or {}
    if "input_tokens" in usage:
        return (
            int(usage.get("input_tokens", 0)),
            int((usage.get("input_tokens_details") or {}).get("cached_tokens", 0)),
            int(usage.get("output_tokens", 0)),
            int((usage.get("output_tokens_details") or {}).get("reasoning_tokens", 0)),
        )
    return (
        int(usage.get("prompt_tokens", 0)),
        int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
        int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)),
    )


def decode_base64_embedding(data: str) -> list[float]:
    """Floats of a base64 embedding (little-endian float32), for tests."""
    raw = base64.b64decode(data)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))
