"""``@task.synth_cortex_batch``: the function returns records or chat request lines; Cortex answers them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_synth.batch.checks import checks_for
from airflow_provider_synth.batch.requests import RequestTemplate
from airflow_provider_synth.decorators._base import (
    SynthBatchDecoratedOperator,
    batch_task_decorator,
    decorated_template_fields,
    requests_path,
)
from airflow_provider_synth.operators.cortex import CortexBatchOperator

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskDecorator
    from airflow.sdk import Context


class CortexBatchDecoratedOperator(SynthBatchDecoratedOperator, CortexBatchOperator):
    """:class:`~airflow_provider_synth.operators.cortex.CortexBatchOperator` answering what the decorated
    function returns: chat request lines, or records built into them with ``model`` and ``template``. They are
    written to ``<output_path>/_work/requests.jsonl`` and staged from there.

    :param python_callable: the function returning the records or request lines.
    :param template: how records become chat requests (:class:`~airflow_provider_synth.batch.requests.RequestTemplate`).
    :param kwargs: ``op_args``, ``op_kwargs`` and the operator's arguments (``output_path``, ``model``,
        ``conn_id``...).
    """

    template_fields: Sequence[str] = decorated_template_fields(CortexBatchOperator.template_fields, "input_path")
    custom_operator_name = "@task.synth_cortex_batch"

    def __init__(self, *, python_callable: Callable[..., Any], template: RequestTemplate | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("input_path", "")  # the file written from what the function returns
        super().__init__(python_callable=python_callable, **kwargs)
        self.template = template or RequestTemplate()
        self.checks = checks_for(self.checks, self.template.response_format)  # a schema the user wrote is checked

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None,
                         run: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        self.input_path = requests_path(self.output_path)  # a resumed task finds its run from this file
        return super().execute_complete(context, event, run, **kwargs)


def synth_cortex_batch_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """Wrap a function returning records or chat request lines into a
    :class:`~airflow_provider_synth.operators.cortex.CortexBatchOperator` task whose XCom is the manifest.

    :param python_callable: the function to decorate.
    :param kwargs: the operator's arguments, and ``template``.
    """
    return batch_task_decorator(CortexBatchDecoratedOperator, python_callable, **kwargs)
