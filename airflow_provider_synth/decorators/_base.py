"""What the batch decorators share: one decorated-operator base (:class:`SynthBatchDecoratedOperator`) that
calls the function, checks what it returned, and hands it to the backend's operator, and one factory.

A backend's decorator is ``class XDecoratedOperator(SynthBatchDecoratedOperator, XBatchOperator)`` with a
``custom_operator_name``, and ``x_task = batch_task_decorator(XDecoratedOperator)``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import (
    DecoratedOperator,
    context_merge,
    determine_kwargs,
    task_decorator_factory,
)

from airflow_provider_synth.batch.paths import as_path, join_path, open_path
from airflow_provider_synth.batch.requests import CHAT, RequestTemplate, write_requests

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskDecorator
    from airflow.sdk import Context

#: where a decorated Cortex or vLLM task writes the requests its function returned (the OpenAI operator
#: writes records it was given to the same file)
REQUESTS_FILE = "_work/requests.jsonl"


def call_for_records(operator: Any, context: Context) -> list[Mapping[str, Any]]:
    """Run the decorated function (with its arguments and the context keys it names) and return its records
    or request lines; anything else is a ``TypeError`` that says what was expected."""
    context_merge(context, operator.op_kwargs)
    kwargs = determine_kwargs(operator.python_callable, operator.op_args, context)
    returned = operator.python_callable(*operator.op_args, **kwargs)
    name = getattr(operator.python_callable, "__name__", "the function")
    if isinstance(returned, (str, bytes, Mapping)) or not isinstance(returned, Iterable):
        raise TypeError(f"{operator.custom_operator_name}: {name}() must return a list of records or request "
                        f"lines (dicts), got {type(returned).__name__}; for a JSONL file use the operator's "
                        "input_path instead")
    items = list(returned)
    bad = next((i for i, item in enumerate(items) if not isinstance(item, Mapping)), None)
    if bad is not None:
        raise TypeError(f"{operator.custom_operator_name}: item {bad} returned by {name}() is a "
                        f"{type(items[bad]).__name__}, not a dict (a record or a request line)")
    if not items:
        raise ValueError(f"{operator.custom_operator_name}: {name}() returned no records")
    return items


def is_request_line(item: Mapping[str, Any]) -> bool:
    return "custom_id" in item and "body" in item


def as_request_lines(items: list[Mapping[str, Any]], *, model: str | None, endpoint: str,
                     template: RequestTemplate) -> list[Mapping[str, Any]]:
    """Request lines as given, or built from records with ``template`` (which then needs ``model``)."""
    if all(is_request_line(i) for i in items):
        return items
    if not model:
        raise ValueError("building requests from records needs model=")
    return list(template.build(items, model=model, endpoint=endpoint))


def requests_path(output_path: Any) -> Any:
    """The request file of a decorated task's run, inside its output folder (so a resumed task finds it)."""
    return join_path(as_path(output_path), REQUESTS_FILE)


def write_request_file(output_path: Any, lines: Iterable[Mapping[str, Any]]) -> Any:
    path = requests_path(output_path)
    with open_path(path, "wb") as fp:
        write_requests(lines, fp)
    return path


def decorated_template_fields(operator_fields: Sequence[str], *replaced: str) -> tuple[str, ...]:
    """A decorated operator's template fields: the function's, then the operator's but those the function's
    return value replaces (``input_path``, ``requests``)."""
    return (*DecoratedOperator.template_fields, *(f for f in operator_fields if f not in replaced))


class SynthBatchDecoratedOperator(DecoratedOperator):
    """The base of every batch decorator's operator: put it first, before the backend's operator, in the bases.

    At execution the function runs (with its arguments and the context keys it names); what it returns,
    records or request lines, becomes the run's input (:meth:`take_records`). Keep it deterministic: a
    retried task calls it again, and re-attaches to what it paid for only when the requests are the same.

    :param python_callable: the function returning the records or request lines.
    :param op_args: positional arguments of the function (templated).
    :param op_kwargs: keyword arguments of the function (templated).
    :param kwargs: the backend operator's arguments (``output_path``, ``model``, ``conn_id``, ``config``...).
    """

    template_fields_renderers: ClassVar[dict[str, str]] = {**DecoratedOperator.template_fields_renderers}
    #: built requests use this endpoint unless the operator has its own ``endpoint``
    default_endpoint: ClassVar[str] = CHAT

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Collection[Any] | None = None,
                 op_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs, **kwargs)

    def take_records(self, items: list[Mapping[str, Any]]) -> None:
        """Make ``items`` the run's input: request lines (built from records with ``template``) written to
        ``<output_path>/_work/requests.jsonl``, which becomes ``input_path``."""
        op: Any = self
        template = getattr(op, "template", None) or RequestTemplate()
        lines = as_request_lines(items, model=op.model, endpoint=getattr(op, "endpoint", self.default_endpoint),
                                 template=template)
        op.input_path = write_request_file(op.output_path, lines)

    def execute(self, context: Context) -> Any:
        op: Any = self
        op.claim_output(context)  # before anything is written into the output folder
        self.take_records(call_for_records(self, context))
        return super().execute(context)


def batch_task_decorator(operator_class: type[Any], python_callable: Callable[..., Any] | None = None,
                         **kwargs: Any) -> TaskDecorator:
    """The TaskFlow decorator of a batch operator: its XCom is the manifest.

    :param operator_class: the backend's :class:`SynthBatchDecoratedOperator` subclass.
    :param python_callable: the function to decorate.
    :param kwargs: the operator's arguments.
    """
    return task_decorator_factory(python_callable=python_callable, multiple_outputs=False,
                                  decorated_operator_class=operator_class, **kwargs)
