"""Request mapping and codecs: an OpenAI body onto the engine's sampling or pooling inputs, and a finished
output back onto a response body (:class:`PlainCodec`; chat the way ``run_batch`` answers it is
:mod:`~airflow_provider_synth.engine.vllm.chat`).
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from airflow_provider_synth.batch.requests import COMPLETIONS
from airflow_provider_synth.engine.vllm.config import Request, RunnerConfig

#: OpenAI body keys -> vLLM ``SamplingParams`` names. Keys absent here and in ``_IGNORED`` pass through
#: unchanged when ``SamplingParams`` knows them (top_k, min_p, repetition_penalty, min_tokens, ...).
_RENAMED = {"max_completion_tokens": "max_tokens"}
#: Body keys that are not sampling parameters (or that the runner handles itself).
_IGNORED = frozenset({
    "model", "messages", "prompt", "input", "stream", "stream_options", "user", "metadata", "store",
    "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "response_format", "service_tier",
    "logprobs", "top_logprobs", "encoding_format", "dimensions", "reasoning_effort", "modalities",
})



def sampling_kwargs(body: dict[str, Any], defaults: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """Sampling parameters for one request: the defaults, overridden by the OpenAI body's values."""
    # without max_tokens a request may generate up to the context length, as in the OpenAI API
    kwargs: dict[str, Any] = {"max_tokens": None} if "max_tokens" in known else {}
    kwargs.update(defaults)
    for key, value in body.items():
        if key in _IGNORED or value is None:
            continue
        name = _RENAMED.get(key, key)
        if name in known:
            kwargs[name] = value
    if body.get("logit_bias") and "logit_bias" in known:
        kwargs["logit_bias"] = {int(k): float(v) for k, v in body["logit_bias"].items()}
    return kwargs


def structured_outputs_kwargs(body: dict[str, Any]) -> dict[str, Any] | None:
    """``StructuredOutputsParams`` kwargs for an OpenAI ``response_format``, or None for plain text."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"json_object": True}
    if fmt["type"] == "json_schema":
        return {"json": (fmt.get("json_schema") or {}).get("schema", {})}
    raise ValueError(f"unsupported response_format type {fmt['type']!r}")


def completion_prompt(value: Any) -> Any:
    """The one prompt of a ``/v1/completions`` body: a string or token ids (a list of one of those too)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return {"prompt_token_ids": value}
    raise ValueError("body.prompt must be one string or one list of token ids")


def embedding_prompts(value: Any) -> list[Any]:
    """The prompts of one embeddings request: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [{"prompt_token_ids": value}]
    if isinstance(value, list) and value:
        return [v if isinstance(v, str) else {"prompt_token_ids": list(v)} for v in value]
    raise ValueError("body.input must be a string, a list of strings, or token ids")


def encode_embedding(values: Sequence[float], encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return list(values)


class Codec(Protocol):
    """Maps one request onto the engine, and the engine's finished output back onto a response body."""

    def enqueue(self, req: Request) -> tuple[list[str], Any]:
        """Add ``req`` to the engine; return the engine's request ids and what :meth:`body` needs of it.
        Raises when the request is refused (its line becomes an error line)."""
        ...

    def body(self, req: Request, state: Any, out: Any, rid: str) -> dict[str, Any]:
        """The response body for a finished ``RequestOutput``."""
        ...


class PlainCodec:
    """OpenAI body keys mapped by name onto sampling parameters; bodies built here. Serves
    ``/v1/completions`` (``run_batch`` does not), and chat where vLLM's OpenAI protocol is not at hand.

    :param llm: the engine (``enqueue_chat``/``enqueue``, as ``vllm.LLM``).
    :param cfg: the run's configuration.
    :param make_sampling: builds ``SamplingParams`` from keyword arguments and structured-output kwargs.
    :param known_sampling: the names ``SamplingParams`` accepts.
    """

    def __init__(self, llm: Any, cfg: RunnerConfig, make_sampling: Callable[..., Any],
                 known_sampling: frozenset[str]) -> None:
        self.llm = llm
        self.cfg = cfg
        self.make_sampling = make_sampling
        self.known_sampling = known_sampling
        self.model_name = cfg.served_names()[0]

    def enqueue(self, req: Request) -> tuple[list[str], Any]:
        kwargs = sampling_kwargs(req.body, self.cfg.sampling, self.known_sampling)
        params = self.make_sampling(kwargs, structured_outputs_kwargs(req.body))
        if req.url == COMPLETIONS:
            return list(self.llm.enqueue(completion_prompt(req.body.get("prompt")), params, use_tqdm=False)), None
        ids = self.llm.enqueue_chat(req.body["messages"], params, use_tqdm=False, tools=req.body.get("tools"),
                                    chat_template_kwargs=req.body.get("chat_template_kwargs"))
        return list(ids), None

    def body(self, req: Request, state: Any, out: Any, rid: str) -> dict[str, Any]:
        prompt = len(out.prompt_token_ids or ())
        completion = sum(len(c.token_ids) for c in out.outputs)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens or 0}}
        if req.url == COMPLETIONS:
            choices = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for c in out.outputs]
            return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": usage}
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish_reason} for c in out.outputs]
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": usage}
