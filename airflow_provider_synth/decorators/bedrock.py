"""``@task.synth_bedrock_batch``: the function returns records or request lines; Bedrock batch jobs answer them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_synth.decorators._base import (
    SynthBatchDecoratedOperator,
    batch_task_decorator,
    decorated_template_fields,
    requests_path,
)
from airflow_provider_synth.operators.bedrock import BedrockBatchOperator

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskDecorator
    from airflow.sdk import Context


class BedrockBatchDecoratedOperator(SynthBatchDecoratedOperator, BedrockBatchOperator):
    """:class:`~airflow_provider_synth.operators.bedrock.BedrockBatchOperator` answering what the decorated
    function returns: request lines, or records built into them with ``model``, ``template`` and
    ``config.endpoint`` (``/v1/embeddings`` for Titan embeddings). They are written to
    ``<output_path>/_work/requests.jsonl`` and translated from there.

    :param python_callable: the function returning the records or request lines.
    :param kwargs: ``op_args``, ``op_kwargs`` and the operator's arguments (``output_path``, ``model``,
        ``template``, ``retry_failed_requests``, ``max_cost_usd``, ``conn_id``, ``config`` with ``role_arn`` and
        ``staging_prefix``...).
    """

    template_fields: Sequence[str] = decorated_template_fields(BedrockBatchOperator.template_fields, "input_path")
    custom_operator_name = "@task.synth_bedrock_batch"

    def __init__(self, *, python_callable: Callable[..., Any], **kwargs: Any) -> None:
        kwargs.setdefault("input_path", "")  # the file written from what the function returns
        super().__init__(python_callable=python_callable, **kwargs)

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None,
                         **kwargs: Any) -> dict[str, Any]:
        self.input_path = requests_path(self.output_path)
        return super().execute_complete(context, event, **kwargs)


def synth_bedrock_batch_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """Wrap a function returning records or request lines into a
    :class:`~airflow_provider_synth.operators.bedrock.BedrockBatchOperator` task whose XCom is the manifest.

    :param python_callable: the function to decorate.
    :param kwargs: the operator's arguments.
    """
    return batch_task_decorator(BedrockBatchDecoratedOperator, python_callable, **kwargs)
