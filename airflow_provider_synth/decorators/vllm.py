"""``@task.synth_vllm_batch``: the function returns records or request lines; a vLLM engine answers them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import DecoratedOperator, task_decorator_factory

from airflow_provider_synth.batch.requests import CHAT
from airflow_provider_synth.decorators._base import as_request_lines, call_for_records, write_request_file
from airflow_provider_synth.operators.openai_batch import RequestTemplate
from airflow_provider_synth.operators.vllm import VLLMBatchOperator

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskDecorator
    from airflow.sdk import Context


class VLLMBatchDecoratedOperator(DecoratedOperator, VLLMBatchOperator):
    """:class:`~airflow_provider_synth.operators.vllm.VLLMBatchOperator` answering what the decorated function
    returns: request lines, or records built into requests for ``model`` with ``endpoint`` and ``template``.
    They are written to ``<output_path>/_work/requests.jsonl``; a retry that gets the same requests resumes
    the engine's saved answers.

    :param python_callable: the function returning the records or request lines.
    :param op_args: positional arguments of the function (templated).
    :param op_kwargs: keyword arguments of the function (templated).
    :param endpoint: the endpoint of requests built from records: chat, completions, embeddings, or
        ``/v1/score`` and ``/v1/rerank`` (whose records carry ``text_1``/``text_2`` or ``query``/``documents``).
    :param template: how records become requests (:class:`RequestTemplate`).
    :param kwargs: the operator's arguments (``output_path``, ``model``, ``python``, ``engine``...).
    """

    template_fields: Sequence[str] = (
        *DecoratedOperator.template_fields,
        *(f for f in VLLMBatchOperator.template_fields if f != "input_path"),
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {**DecoratedOperator.template_fields_renderers}
    custom_operator_name = "@task.synth_vllm_batch"

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Collection[Any] | None = None,
                 op_kwargs: Mapping[str, Any] | None = None, endpoint: str = CHAT,
                 template: RequestTemplate | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("input_path", "")  # the file written from what the function returns
        super().__init__(python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs, **kwargs)
        self.endpoint, self.template = endpoint, template or RequestTemplate()

    def execute(self, context: Context) -> Any:
        self.claim_output(context)  # before anything is written into the output folder
        lines = as_request_lines(call_for_records(self, context), model=self.model, endpoint=self.endpoint,
                                 template=self.template)
        self.input_path = write_request_file(self.output_path, lines)
        return super().execute(context)


def synth_vllm_batch_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """Wrap a function returning records or request lines into a
    :class:`~airflow_provider_synth.operators.vllm.VLLMBatchOperator` task whose XCom is the manifest.

    :param python_callable: the function to decorate.
    :param kwargs: the operator's arguments, ``endpoint`` and ``template``.
    """
    return task_decorator_factory(python_callable=python_callable, multiple_outputs=False,
                                  decorated_operator_class=VLLMBatchDecoratedOperator, **kwargs)
