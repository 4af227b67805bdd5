"""The provider-neutral core: build, validate, split, parse, merge, extract, usage and cost.

No Airflow imports here: the same code serves operators, the CLI, the vLLM runner and plain scripts. Every
function reads and writes through file objects, so local paths and ObjectStoragePath/fsspec URLs both work.
"""

from __future__ import annotations

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.errors import (
    AccountingError,
    BatchCoreError,
    InvalidRequestsError,
    OutputFormatError,
    Problem,
)
from airflow_provider_synth.batch.extract import (
    extract_embeddings,
    extract_messages_from_responses,
    extract_parsed,
    extract_text,
    extract_tool_calls,
    get_requests_by_custom_ids,
    get_results,
    get_unsuccessful_requests,
    iter_parsed,
    parse_structured,
)
from airflow_provider_synth.batch.merge import Accounting, ShardOutputs, merge_shards, pending_requests
from airflow_provider_synth.batch.requests import build_requests, chat_body, make_request, write_requests
from airflow_provider_synth.batch.results import error_line, parse_output_line, success_line
from airflow_provider_synth.batch.split import ShardLimits, SplitResult, split_requests
from airflow_provider_synth.batch.usage import Usage, cost_usd, estimate_request_tokens
from airflow_provider_synth.batch.validate import validate_requests

__all__ = [
    "Accounting", "AccountingError", "BatchCoreError", "InvalidRequestsError", "OutputChecks", "OutputFormatError",
    "Problem",
    "ShardLimits", "ShardOutputs", "SplitResult", "Usage", "build_requests", "chat_body", "cost_usd",
    "error_line", "estimate_request_tokens", "extract_embeddings", "extract_messages_from_responses", "extract_parsed",
    "extract_text", "extract_tool_calls", "get_requests_by_custom_ids", "get_results",
    "get_unsuccessful_requests", "iter_parsed", "make_request", "merge_shards", "parse_output_line", "parse_structured",
    "pending_requests", "split_requests", "success_line", "validate_requests", "write_requests",
]
