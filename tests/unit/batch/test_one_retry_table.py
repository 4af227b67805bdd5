"""ONE retry/transient table: a result line and a poll agree on every HTTP status, on every backend.

Old main had five tables: a result line retried any 5xx (501 and 505 included) while the OpenAI and Cortex
polls took 501/505 for fatal and the Anthropic and Bedrock hooks any 5xx for transient."""

from __future__ import annotations

import httpx2
import pytest

from airflow_provider_synth.batch.results import TRANSIENT_HTTP_STATUSES, error_line, parse_output_line
from airflow_provider_synth.hooks.cortex import StatementPollError
from airflow_provider_synth.hooks.openai import is_transient as openai_is_transient

STATUSES = [400, 401, 403, 404, 408, 409, 422, 429, 500, 501, 502, 503, 504, 505, 507, 529]


def _openai_error(status: int) -> BaseException:
    import openai

    request = httpx2.Request("GET", "https://api.openai.test/v1/batches/b")
    return openai.APIStatusError("boom", response=httpx2.Response(status, request=request), body=None)


@pytest.mark.parametrize("status", STATUSES)
def test_a_result_line_and_every_poll_agree(status: int) -> None:
    line = parse_output_line(error_line("c1", "server_error" if status >= 500 else "bad", "x", status_code=status))
    transient = status in TRANSIENT_HTTP_STATUSES
    assert line.retryable is transient
    assert openai_is_transient(_openai_error(status)) is transient
    assert StatementPollError("q", status, "x").transient is transient


@pytest.mark.parametrize("status", STATUSES)
def test_anthropic_and_bedrock_polls_agree(status: int) -> None:
    anthropic = pytest.importorskip("anthropic")
    pytest.importorskip("botocore")
    from botocore.exceptions import ClientError

    from airflow_provider_synth.hooks.anthropic import is_transient as anthropic_is_transient
    from airflow_provider_synth.hooks.bedrock import is_transient as bedrock_is_transient

    transient = status in TRANSIENT_HTTP_STATUSES
    request = httpx2.Request("GET", "https://api.anthropic.test/v1/messages/batches/b")
    try:
        error: BaseException = anthropic.APIStatusError("boom", response=httpx2.Response(status, request=request),
                                                        body=None)
    except TypeError:  # an SDK on httpx rather than httpx2
        import httpx

        error = anthropic.APIStatusError("boom", response=httpx.Response(
            status, request=httpx.Request("GET", "https://api.anthropic.test/")), body=None)
    assert anthropic_is_transient(error) is transient
    client_error = ClientError({"Error": {"Code": "Whatever"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                               "GetModelInvocationJob")
    assert bedrock_is_transient(client_error) is transient


def test_lines_without_a_status_are_judged_by_their_code() -> None:
    assert parse_output_line(error_line("c1", "batch_expired", "x")).retryable
    assert parse_output_line(error_line("c1", "request_timeout", "x")).retryable
    assert not parse_output_line(error_line("c1", "batch_cancelled", "x")).retryable
