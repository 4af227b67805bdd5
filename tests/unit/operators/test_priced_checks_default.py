"""THE default of ``checks`` beside a template's ``response_format`` (``batch.checks.checks_for``), the same on
every priced backend: a schema the user wrote is checked. Before, Anthropic checked it only when ``checks=`` was
given, and Bedrock never."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pydantic
import pytest

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.requests import RequestTemplate


class Quiz(pydantic.BaseModel):
    question: str
    answer: str


RECORDS = [{"id": "q1", "topic": "tides"}]


def openai(**kwargs: Any) -> Any:
    from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator

    return OpenAIBatchOperator(task_id="t", requests=RECORDS, model="gpt-4o-mini", output_path="/tmp/out", **kwargs)


def anthropic(**kwargs: Any) -> Any:
    from airflow_provider_synth.operators.anthropic import AnthropicBatchOperator

    return AnthropicBatchOperator(task_id="t", requests=RECORDS, model="claude-haiku-4-5", output_path="/tmp/out",
                                  **kwargs)


def bedrock(**kwargs: Any) -> Any:
    from airflow_provider_synth.operators.bedrock import BedrockBatchOperator
    from airflow_provider_synth.runs.bedrock import BedrockBatchConfig

    config = BedrockBatchConfig(role_arn="arn:aws:iam::123456789012:role/r", staging_prefix="s3://bucket/stage")
    return BedrockBatchOperator(task_id="t", requests=RECORDS, model="meta.llama3-1-8b-instruct-v1:0",
                                output_path="/tmp/out", config=config, **kwargs)


PRICED = [openai, anthropic, bedrock]
TEMPLATE = RequestTemplate(prompt_template="A quiz about {topic}", id_field="id", response_format=Quiz)


@pytest.mark.parametrize("make", PRICED, ids=lambda f: f.__name__)
def test_a_templates_response_format_is_checked_without_checks(make: Callable[..., Any]) -> None:
    op = make(template=TEMPLATE)
    assert op.checks is not None and op.checks.schema is Quiz
    assert op.checks.checker() is not None


@pytest.mark.parametrize("make", PRICED, ids=lambda f: f.__name__)
def test_given_checks_get_the_templates_schema_and_schema_false_opts_out(make: Callable[..., Any]) -> None:
    op = make(template=TEMPLATE, checks=OutputChecks(finish_reasons={"length"}))
    assert op.checks.schema is Quiz and op.checks.finish_reasons == {"length"}
    off = make(template=TEMPLATE, checks=OutputChecks(schema=False))
    assert off.checks is None or off.checks.checker() is None


@pytest.mark.parametrize("make", PRICED, ids=lambda f: f.__name__)
def test_without_a_schema_nothing_is_checked_by_default(make: Callable[..., Any]) -> None:
    op = make(template=RequestTemplate(prompt_template="About {topic}", id_field="id"))
    assert op.checks is None or op.checks.checker() is None


@pytest.mark.parametrize("make", PRICED, ids=lambda f: f.__name__)
def test_exactly_one_input(make: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match="exactly one of input_path or requests"):
        make(input_path="/tmp/requests.jsonl")
