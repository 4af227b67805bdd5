"""``@task.synth_anthropic_batch``: the function returns records or request lines; Claude answers them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import DecoratedOperator, task_decorator_factory

from airflow_provider_synth.decorators._base import call_for_records
from airflow_provider_synth.operators.anthropic import AnthropicBatchOperator

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskDecorator
    from airflow.sdk import Context


class AnthropicBatchDecoratedOperator(DecoratedOperator, AnthropicBatchOperator):
    """:class:`~airflow_provider_synth.operators.anthropic.AnthropicBatchOperator` whose ``requests`` are what
    the decorated function returns: records (built with ``model`` and ``template``), OpenAI batch lines or
    Anthropic ``{"custom_id", "params"}`` lines. Keep the function deterministic: a retried task calls it again
    and re-attaches to its batches only when the requests are the same.

    :param python_callable: the function returning the records or request lines.
    :param op_args: positional arguments of the function (templated).
    :param op_kwargs: keyword arguments of the function (templated).
    :param kwargs: the operator's arguments (``output_path``, ``model``, ``template``, ``conn_id``...).
    """

    template_fields: Sequence[str] = (
        *DecoratedOperator.template_fields,
        *(f for f in AnthropicBatchOperator.template_fields if f != "requests"),
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {**DecoratedOperator.template_fields_renderers}
    custom_operator_name = "@task.synth_anthropic_batch"

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Collection[Any] | None = None,
                 op_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("requests", [])  # replaced by what the function returns, at execution
        super().__init__(python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs, **kwargs)

    def execute(self, context: Context) -> Any:
        self.claim_output(context)  # before anything is written into the output folder
        self.requests = call_for_records(self, context)
        return super().execute(context)


def synth_anthropic_batch_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """Wrap a function returning records or request lines into an
    :class:`~airflow_provider_synth.operators.anthropic.AnthropicBatchOperator` task whose XCom is the manifest.

    :param python_callable: the function to decorate.
    :param kwargs: the operator's arguments.
    """
    return task_decorator_factory(python_callable=python_callable, multiple_outputs=False,
                                  decorated_operator_class=AnthropicBatchDecoratedOperator, **kwargs)
