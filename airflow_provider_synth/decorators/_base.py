"""What the batch decorators share: call the function, check what it returned, write it as request JSONL."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import context_merge, determine_kwargs

from airflow_provider_synth.batch.paths import as_path, join_path, open_path
from airflow_provider_synth.batch.requests import build_requests, write_requests

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_synth.operators.openai_batch import RequestTemplate

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
    t = template
    return list(build_requests(items, model=model, endpoint=endpoint, builder=t.builder,
                               prompt_template=t.prompt_template, system=t.system, id_field=t.id_field,
                               params=t.params, response_format=t.response_format, tools=t.tools))


def requests_path(output_path: Any) -> Any:
    """The request file of a decorated task's run, inside its output folder (so a resumed task finds it)."""
    return join_path(as_path(output_path), REQUESTS_FILE)


def write_request_file(output_path: Any, lines: Iterable[Mapping[str, Any]]) -> Any:
    path = requests_path(output_path)
    with open_path(path, "wb") as fp:
        write_requests(lines, fp)
    return path
