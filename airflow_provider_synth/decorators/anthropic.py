"""``@task.synth_anthropic_batch``: the function returns records or request lines; Claude answers them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_synth.decorators._base import (
    SynthBatchDecoratedOperator,
    batch_task_decorator,
    decorated_template_fields,
)
from airflow_provider_synth.operators.anthropic import AnthropicBatchOperator

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskDecorator


class AnthropicBatchDecoratedOperator(SynthBatchDecoratedOperator, AnthropicBatchOperator):
    """:class:`~airflow_provider_synth.operators.anthropic.AnthropicBatchOperator` whose ``requests`` are what
    the decorated function returns: records (built with ``model`` and ``template``), OpenAI batch lines or
    Anthropic ``{"custom_id", "params"}`` lines.

    :param python_callable: the function returning the records or request lines.
    :param kwargs: the operator's arguments (``output_path``, ``model``, ``template``, ``conn_id``, ``config``...).
    """

    template_fields: Sequence[str] = decorated_template_fields(AnthropicBatchOperator.template_fields, "requests")
    custom_operator_name = "@task.synth_anthropic_batch"

    def __init__(self, *, python_callable: Callable[..., Any], **kwargs: Any) -> None:
        kwargs.setdefault("requests", [])  # replaced by what the function returns, at execution
        super().__init__(python_callable=python_callable, **kwargs)

    def take_records(self, items: list[Mapping[str, Any]]) -> None:
        self.requests = items  # built and written with the plan, like records given as requests=


def synth_anthropic_batch_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """Wrap a function returning records or request lines into an
    :class:`~airflow_provider_synth.operators.anthropic.AnthropicBatchOperator` task whose XCom is the manifest.

    :param python_callable: the function to decorate.
    :param kwargs: the operator's arguments.
    """
    return batch_task_decorator(AnthropicBatchDecoratedOperator, python_callable, **kwargs)
