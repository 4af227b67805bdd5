"""Deterministic stand-in answers for batch requests, shaped like the real OpenAI response bodies.

The same request always gets the same answer and the same usage, so tests can assert on them.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

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


def _tokens(text_len: int) -> int:
    return max(1, math.ceil(text_len / 4))


def _text_len(value: Any) -> int:
    """Characters of text in a message content / input value (strings nested in lists and dicts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_len(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_len(v) for k, v in value.items() if k in ("content", "text", "input", "prompt"))
    return 0


def input_tokens(body: dict[str, Any]) -> int:
    """Estimated input tokens of a request body (characters / 4), as counted against enqueued-token limits."""
    messages = body.get("messages") or []
    chars = _text_len(messages) + 4 * len(messages) if isinstance(messages, list) else 0
    for key in ("input", "prompt", "instructions"):
        value = body.get(key)
        if isinstance(value, list) and value and isinstance(value[0], int):
            return len(value)
        chars += _text_len(value)
    return _tokens(chars)


def answer_text(seed: bytes, min_words: int = 6, max_words: int = 40) -> str:
    """A sentence of ``min_words``..``max_words`` words picked by ``seed``."""
    rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
    n = int(rng.integers(min_words, max_words + 1))
    words = [_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), n)]
    return f"Synthetic answer {seed.hex()[:8]}: " + " ".join(words) + "."


def instance_of(schema: Any, seed: bytes, depth: int = 0) -> Any:
    """A small value valid for a (simple) JSON schema: objects, arrays, enums, strings, numbers, booleans."""
    if not isinstance(schema, dict) or depth > 6:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][seed[depth % len(seed)] % len(schema["enum"])]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return instance_of(schema[key][0], seed, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    makers: dict[str, Callable[[], Any]] = {
        "object": lambda: {
            name: instance_of(sub, digest(seed.hex(), name), depth + 1)
            for name, sub in schema.get("properties", {}).items()
        },
        "array": lambda: [
            instance_of(schema.get("items", {}), digest(seed.hex(), i), depth + 1)
            for i in range(max(1, int(schema.get("minItems", 1))))
        ],
        "string": lambda: " ".join(answer_text(seed, 2, 6).split()[2:]),
        "integer": lambda: int(seed[0]),
        "number": lambda: round(seed[0] / 7, 3),
        "boolean": lambda: bool(seed[0] & 1),
    }
    return makers.get(kind, lambda: None)()


def _usage(prompt_chars: int, completion_chars: int, model: str) -> dict[str, Any]:
    prompt = _tokens(prompt_chars)
    completion = _tokens(completion_chars)
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


def _chat_message(body: dict[str, Any], seed: bytes, content: str | None) -> tuple[dict[str, Any], str, int]:
    tool = _forced_tool(body) if content is None else None
    if tool is not None:
        args = orjson.dumps(instance_of(tool.get("parameters", {}), seed)).decode()
        call = {"id": "call_" + seed.hex()[:24], "type": "function", "function": {"name": tool["name"], "arguments": args}}
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
        return message, "tool_calls", len(args)
    fmt = body.get("response_format") or {}
    if content is None and fmt.get("type") == "json_schema":
        content = orjson.dumps(instance_of((fmt.get("json_schema") or {}).get("schema", {}), seed)).decode()
    elif content is None and fmt.get("type") == "json_object":
        content = orjson.dumps({"answer": answer_text(seed)}).decode()
    text = content if content is not None else answer_text(seed)
    finish = "stop"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and _tokens(len(text)) > limit:
        text, finish = text[: limit * 4], "length"
    return {"role": "assistant", "content": text, "refusal": None, "annotations": []}, finish, len(text)


def chat_completion(body: dict[str, Any], custom_id: str, content: str | None = None) -> dict[str, Any]:
    """A ``chat.completion`` body for a ``/v1/chat/completions`` request."""
    model = str(body.get("model", "gpt-4o-mini"))
    messages = body.get("messages") or []
    choices, completion_chars = [], 0
    for index in range(int(body.get("n") or 1)):
        seed = digest(custom_id, messages, index)
        message, finish, chars = _chat_message(body, seed, content)
        completion_chars += chars
        choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
    return {
        "id": "chatcmpl-" + digest(custom_id, messages).hex()[:29],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(_text_len(messages) + 4 * len(messages), completion_chars, model),
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
    prompt = sum(len(i) if isinstance(i, list) else _tokens(len(str(i))) for i in items)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def responses(body: dict[str, Any], custom_id: str, content: str | None = None) -> dict[str, Any]:
    """A ``response`` body for a ``/v1/responses`` request."""
    model = str(body.get("model", "gpt-4o-mini"))
    seed = digest(custom_id, body.get("input"), body.get("instructions"))
    text = content if content is not None else answer_text(seed)
    usage = _usage(_text_len(body.get("input")) + _text_len(body.get("instructions")), len(text), model)
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
    usage = _usage(_text_len(prompt), len(text), model)
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
