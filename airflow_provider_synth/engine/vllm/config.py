"""The engine run's configuration, its request record, its exit codes and its progress events.

Runs in the vLLM interpreter; imports only the standard library and this provider's core.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_synth.batch.jsonl import loads
from airflow_provider_synth.batch.requests import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RERANK,
    SCORE,
    VLLM_ENDPOINTS,
    canonical_url,
)

EVENT_KEY = "synth_vllm"
EXIT_BAD_CONFIG = 2
EXIT_NO_VLLM = 3
EXIT_MODEL_LOAD = 4
EXIT_ENGINE = 5

GENERATE_URLS = (CHAT, COMPLETIONS)
_POOLING_KINDS = {EMBEDDINGS: "embed", SCORE: "score", RERANK: "rerank"}


def pooling_kind(url: str) -> str | None:
    """``"embed"``, ``"score"`` or ``"rerank"`` for a pooling endpoint (``/score``, ``/v1/score``, ``/rerank``,
    ``/v1/rerank``, ``/v2/rerank`` as ``run_batch`` spells them); None for a generation endpoint."""
    return _POOLING_KINDS.get(canonical_url(url, VLLM_ENDPOINTS) or url)


def emit(event: str, **fields: Any) -> None:
    """Write one progress event as a JSON line on stdout (the operator relays it to the task log)."""
    sys.stdout.write(json.dumps({EVENT_KEY: event, **fields}, default=str) + "\n")
    sys.stdout.flush()


@dataclass
class RunnerConfig:
    """What one run does; read from the ``--config`` JSON file.

    :param input: local path of the request JSONL.
    :param output: local path of the output JSONL (appended to; it is the resume state).
    :param model: a path or model id the node can load.
    :param llm_kwargs: keyword arguments for ``vllm.LLM`` (dtype, tensor_parallel_size, max_model_len...).
    :param sampling: default sampling parameters (vLLM names); each request's body overrides them.
    :param chunk_size: requests in the engine at once (embeddings: per engine call), and the most answers
        held in memory before they are written and synced.
    :param served_model_name: the ``model`` written in response bodies (kept for old configurations; the
        first of ``served_model_names`` wins).
    :param served_model_names: the names a line's ``model`` may use for this engine (as vLLM's
        ``--served-model-name``); the first is written in response bodies. Default: ``llm_kwargs``'
        ``served_model_name``, else ``[model]``.
    :param tool_call_parser: vLLM's tool parser for ``message.tool_calls`` (``run_batch --tool-call-parser``).
    :param enable_auto_tool_choice: parse tool calls for ``tool_choice: "auto"`` (``--enable-auto-tool-choice``).
    :param reasoning_parser: vLLM's reasoning parser for ``message.reasoning`` (``--reasoning-parser``).
    :param flush_interval: the most seconds a finished answer waits before it is written and synced.
    :param checks: output checks as :meth:`~airflow_provider_synth.batch.checks.OutputChecks.to_spec` writes
        them (a pydantic model as its JSON schema); with ``retry_failed_requests`` > 0 and ``retry`` set,
        unusable answers are asked again inside the engine.
    :param retry_failed_requests: the most times one request is asked again for an unusable answer (0: the
        checks are left to the merge, which reports unusable answers).
    """

    input: str
    output: str
    model: str
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    chunk_size: int = 1024
    served_model_name: str | None = None
    served_model_names: list[str] | None = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None
    flush_interval: float = 1.0
    checks: dict[str, Any] | None = None
    retry_failed_requests: int = 0

    @classmethod
    def from_file(cls, path: str) -> RunnerConfig:
        with open(path, "rb") as fp:
            data = loads(fp.read())
        return cls(**data)

    def served_names(self) -> list[str]:
        """The model names this engine answers to; the first is the one written in response bodies. Without
        ``served_model_names``, vLLM's own ``served_model_name`` engine argument counts."""
        if self.served_model_names:
            return list(self.served_model_names)
        engine_names = self.llm_kwargs.get("served_model_name")
        if engine_names:
            return [engine_names] if isinstance(engine_names, str) else list(engine_names)
        return [self.served_model_name or self.model]


@dataclass
class Request:
    """One pending request line.

    :param original: the input's body, when ``body`` carries a retry's changes.
    """

    custom_id: str
    url: str
    body: dict[str, Any]
    original: dict[str, Any] | None = None
