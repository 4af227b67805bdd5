"""``@task.synth_vllm_batch``: the function returns records or request lines; a vLLM engine answers them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_synth.batch.checks import checks_for
from airflow_provider_synth.batch.requests import CHAT, RequestTemplate
from airflow_provider_synth.decorators._base import (
    SynthBatchDecoratedOperator,
    batch_task_decorator,
    decorated_template_fields,
)
from airflow_provider_synth.operators.vllm import VLLMBatchOperator

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskDecorator


class VLLMBatchDecoratedOperator(SynthBatchDecoratedOperator, VLLMBatchOperator):
    """:class:`~airflow_provider_synth.operators.vllm.VLLMBatchOperator` answering what the decorated function
    returns: request lines, or records built into requests for ``model`` with ``endpoint`` and ``template``.
    They are written to ``<output_path>/_work/requests.jsonl``; a retry that gets the same requests resumes
    the engine's saved answers.

    :param python_callable: the function returning the records or request lines.
    :param endpoint: the endpoint of requests built from records: chat, completions, embeddings, or
        ``/v1/score`` and ``/v1/rerank`` (whose records carry ``text_1``/``text_2`` or ``query``/``documents``).
    :param template: how records become requests (:class:`~airflow_provider_synth.batch.requests.RequestTemplate`).
    :param kwargs: ``op_args``, ``op_kwargs`` and the operator's arguments (``output_path``, ``model``,
        ``python``, ``engine``...).
    """

    template_fields: Sequence[str] = decorated_template_fields(VLLMBatchOperator.template_fields, "input_path")
    custom_operator_name = "@task.synth_vllm_batch"

    def __init__(self, *, python_callable: Callable[..., Any], endpoint: str = CHAT,
                 template: RequestTemplate | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("input_path", "")  # the file written from what the function returns
        super().__init__(python_callable=python_callable, **kwargs)
        self.endpoint, self.template = endpoint, template or RequestTemplate()
        self.checks = checks_for(self.checks, self.template.response_format)  # a schema the user wrote is checked


def synth_vllm_batch_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """Wrap a function returning records or request lines into a
    :class:`~airflow_provider_synth.operators.vllm.VLLMBatchOperator` task whose XCom is the manifest.

    :param python_callable: the function to decorate.
    :param kwargs: the operator's arguments, ``endpoint`` and ``template``.
    """
    return batch_task_decorator(VLLMBatchDecoratedOperator, python_callable, **kwargs)
