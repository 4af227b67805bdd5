"""The provider-neutral core: build, validate, split, parse, merge, extract, usage and cost.

No Airflow imports here: the same code serves operators, the CLI, the vLLM runner and plain scripts. Every
function reads and writes through file objects, so local paths and ObjectStoragePath/fsspec URLs both work.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> submodule; imported on first use, so that ``batch.status`` (which triggers import inside the
#: triggerer's event loop) costs nothing but itself.
_EXPORTS: dict[str, str] = {
    "OutputChecks": "checks",
    "AccountingError": "errors",
    "BatchCoreError": "errors",
    "InvalidRequestsError": "errors",
    "OutputFormatError": "errors",
    "Problem": "errors",
    "StorageError": "errors",
    "IncompleteFileError": "errors",
    "Moderation": "extract",
    "extract_embeddings": "extract",
    "extract_moderation": "extract",
    "extract_messages_from_responses": "extract",
    "extract_parsed": "extract",
    "extract_text": "extract",
    "extract_tool_calls": "extract",
    "get_requests_by_custom_ids": "extract",
    "get_results": "extract",
    "flagged_ids": "extract",
    "get_unsuccessful_requests": "extract",
    "iter_moderations": "extract",
    "iter_parsed": "extract",
    "parse_structured": "extract",
    "Accounting": "merge",
    "ShardOutputs": "merge",
    "merge_shards": "merge",
    "pending_requests": "merge",
    "build_requests": "requests",
    "chat_body": "requests",
    "make_request": "requests",
    "moderation_input": "requests",
    "write_requests": "requests",
    "error_line": "results",
    "parse_output_line": "results",
    "success_line": "results",
    "ShardLimits": "split",
    "SplitResult": "split",
    "split_requests": "split",
    "Usage": "usage",
    "cost_usd": "usage",
    "estimate_request_tokens": "usage",
    "validate_requests": "validate",
}

if TYPE_CHECKING:
    from airflow_provider_synth.batch.checks import OutputChecks
    from airflow_provider_synth.batch.errors import (
        AccountingError,
        BatchCoreError,
        IncompleteFileError,
        InvalidRequestsError,
        OutputFormatError,
        Problem,
        StorageError,
    )
    from airflow_provider_synth.batch.extract import (
        Moderation,
        extract_embeddings,
        extract_messages_from_responses,
        extract_moderation,
        extract_parsed,
        extract_text,
        extract_tool_calls,
        flagged_ids,
        get_requests_by_custom_ids,
        get_results,
        get_unsuccessful_requests,
        iter_moderations,
        iter_parsed,
        parse_structured,
    )
    from airflow_provider_synth.batch.merge import Accounting, ShardOutputs, merge_shards, pending_requests
    from airflow_provider_synth.batch.requests import (
        build_requests,
        chat_body,
        make_request,
        moderation_input,
        write_requests,
    )
    from airflow_provider_synth.batch.results import error_line, parse_output_line, success_line
    from airflow_provider_synth.batch.split import ShardLimits, SplitResult, split_requests
    from airflow_provider_synth.batch.usage import Usage, cost_usd, estimate_request_tokens
    from airflow_provider_synth.batch.validate import validate_requests


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Accounting", "AccountingError", "BatchCoreError", "InvalidRequestsError", "Moderation", "OutputChecks",
    "OutputFormatError", "Problem", "StorageError", "IncompleteFileError",
    "ShardLimits", "ShardOutputs", "SplitResult", "Usage", "build_requests", "chat_body", "cost_usd",
    "error_line", "estimate_request_tokens", "extract_embeddings", "extract_messages_from_responses", "extract_parsed",
    "extract_moderation", "extract_text", "extract_tool_calls", "flagged_ids", "get_requests_by_custom_ids",
    "get_results", "get_unsuccessful_requests", "iter_moderations", "iter_parsed", "make_request", "merge_shards",
    "moderation_input", "parse_output_line", "parse_structured",
    "pending_requests", "split_requests", "success_line", "validate_requests", "write_requests",
]
