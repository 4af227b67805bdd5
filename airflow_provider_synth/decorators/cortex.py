"""``@task.synth_cortex_batch``: the function returns records or chat request lines; Cortex answers them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import DecoratedOperator, task_decorator_factory

from airflow_provider_synth.batch.requests import CHAT
from airflow_provider_synth.decorators._base import (
    as_request_lines,
    call_for_records,
    requests_path,
    write_request_file,
)
from airflow_provider_synth.operators.cortex import CortexBatchOperator
from airflow_provider_synth.operators.openai_batch import RequestTemplate

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskDecorator
    from airflow.sdk import Context


class CortexBatchDecoratedOperator(DecoratedOperator, CortexBatchOperator):
    """:class:`~airflow_provider_synth.operators.cortex.CortexBatchOperator` answering what the decorated
    function returns: chat request lines, or records built into them with ``model`` and ``template``. They are
    written to ``<output_path>/_work/requests.jsonl`` and staged from there.

    :param python_callable: the function returning the records or request lines.
    :param op_args: positional arguments of the function (templated).
    :param op_kwargs: keyword arguments of the function (templated).
    :param template: how records become chat requests (:class:`RequestTemplate`).
    :param kwargs: the operator's arguments (``output_path``, ``model``, ``snowflake_conn_id``...).
    """

    template_fields: Sequence[str] = (
        *DecoratedOperator.template_fields,
        *(f for f in CortexBatchOperator.template_fields if f != "input_path"),
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {**DecoratedOperator.template_fields_renderers}
    custom_operator_name = "@task.synth_cortex_batch"

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Collection[Any] | None = None,
                 op_kwargs: Mapping[str, Any] | None = None, template: RequestTemplate | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("input_path", "")  # the file written from what the function returns
        super().__init__(python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs, **kwargs)
        self.template = template or RequestTemplate()

    def execute(self, context: Context) -> Any:
        self.claim_output(context)  # before anything is written into the output folder
        lines = as_request_lines(call_for_records(self, context), model=self.model, endpoint=CHAT,
                                 template=self.template)
        self.input_path = write_request_file(self.output_path, lines)
        return super().execute(context)

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None,
                         run: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self.input_path = requests_path(self.output_path)  # a resumed task finds its run from this file
        return super().execute_complete(context, event, run)


def synth_cortex_batch_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """Wrap a function returning records or chat request lines into a
    :class:`~airflow_provider_synth.operators.cortex.CortexBatchOperator` task whose XCom is the manifest.

    :param python_callable: the function to decorate.
    :param kwargs: the operator's arguments, and ``template``.
    """
    return task_decorator_factory(python_callable=python_callable, multiple_outputs=False,
                                  decorated_operator_class=CortexBatchDecoratedOperator, **kwargs)
