"""The batch TaskFlow decorators: registration, what the function may return, and how it becomes requests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from airflow.sdk import DAG, task

from airflow_provider_synth.decorators._base import as_request_lines, call_for_records
from airflow_provider_synth.operators.openai_batch import RequestTemplate
from airflow_provider_synth.testing.vllm import write_fake_python


def test_task_decorators_are_registered_under_names_that_do_not_clash_with_common_ai() -> None:
    from airflow_provider_synth.decorators.cortex import synth_cortex_batch_task
    from airflow_provider_synth.decorators.openai_batch import synth_openai_batch_task
    from airflow_provider_synth.decorators.vllm import synth_vllm_batch_task

    assert task.synth_openai_batch is synth_openai_batch_task
    assert task.synth_cortex_batch is synth_cortex_batch_task
    assert task.synth_vllm_batch is synth_vllm_batch_task


def build(decorator: Any, fn: Any, **kwargs: Any) -> Any:
    with DAG("d", schedule=None):
        return decorator(**kwargs)(fn)().operator


def ctx() -> dict[str, Any]:
    return {"ti": SimpleNamespace(try_number=1, dag_id="d", task_id="t", run_id="r", map_index=-1),
            "params": {"n": 3}}


@pytest.mark.parametrize(("returned", "error", "match"), [
    ("/data/requests.jsonl", TypeError, "must return a list of records or request lines .* got str"),
    ({"id": 1}, TypeError, "got dict"),
    (None, TypeError, "got NoneType"),
    ([{"id": 1}, "two"], TypeError, "item 1 returned by make\\(\\) is a str"),
    ([], ValueError, "returned no records"),
])
def test_what_the_function_returns_is_checked(returned: Any, error: type[Exception], match: str) -> None:
    def make() -> Any:
        return returned

    op = build(task.synth_openai_batch, make, model="m", output_path="/tmp/x")
    with pytest.raises(error, match=match):
        call_for_records(op, ctx())


def test_the_function_gets_its_arguments_and_the_context_keys_it_names() -> None:
    def make(prefix: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return [{"id": f"{prefix}{i}", "prompt": "hi"} for i in range((params or {})["n"])]

    with DAG("d", schedule=None):
        op = task.synth_openai_batch(model="m", output_path="/tmp/x")(make)("q-").operator
    assert [r["id"] for r in call_for_records(op, ctx())] == ["q-0", "q-1", "q-2"]
    assert op.custom_operator_name == "@task.synth_openai_batch"
    assert "requests" not in op.template_fields and "output_path" in op.template_fields


def test_records_are_built_with_the_template_and_request_lines_pass_through() -> None:
    t = RequestTemplate(system="S", prompt_template="Say {word}", id_field="id", params={"max_tokens": 5})
    lines = as_request_lines([{"id": "a", "word": "yes"}], model="m", endpoint="/v1/chat/completions", template=t)
    assert lines[0]["custom_id"] == "a" and lines[0]["body"]["messages"][1]["content"] == "Say yes"
    assert lines[0]["body"]["max_tokens"] == 5
    assert as_request_lines(lines, model=None, endpoint="/v1/chat/completions", template=t) == lines
    with pytest.raises(ValueError, match="needs model="):
        as_request_lines([{"id": "a", "word": "yes"}], model=None, endpoint="/v1/chat/completions", template=t)


def test_vllm_decorator_writes_the_requests_into_the_output_folder_and_runs_them(tmp_path: Path) -> None:
    def make() -> list[dict[str, Any]]:
        return [{"id": f"r{i}", "text": f"tell me about {i}"} for i in range(4)]

    op = build(task.synth_vllm_batch, make, model="tiny", output_path=str(tmp_path / "out"),
               python=write_fake_python(tmp_path / "py"), endpoint="/v1/completions",
               template=RequestTemplate(prompt_template="Q: {text}", id_field="id", params={"max_tokens": 3}))
    manifest = op.execute({**ctx(), "outlet_events": {}})
    assert (manifest["backend"], manifest["total"], manifest["succeeded"]) == ("vllm", 4, 4)
    written = [orjson.loads(x) for x in (tmp_path / "out" / "_work" / "requests.jsonl").read_bytes().splitlines()]
    assert [w["url"] for w in written] == ["/v1/completions"] * 4 and written[2]["body"]["prompt"] == "Q: tell me about 2"
    assert op.input_path == str(tmp_path / "out" / "_work" / "requests.jsonl")


def test_vllm_decorator_builds_rerank_requests_from_records(tmp_path: Path) -> None:
    def make() -> list[dict[str, Any]]:
        return [{"id": "q0", "query": "brown fox", "documents": ["a brown fox", "a dog"]},
                {"id": "q1", "query": "dog", "documents": ["a dog", "a fox", "dogs"]}]

    op = build(task.synth_vllm_batch, make, model="tiny", output_path=str(tmp_path / "out"),
               python=write_fake_python(tmp_path / "py"), endpoint="/rerank",
               template=RequestTemplate(id_field="id", params={"top_n": 2}))
    manifest = op.execute({**ctx(), "outlet_events": {}})
    assert (manifest["total"], manifest["succeeded"], manifest["endpoint"]) == (2, 2, "/v1/rerank")
    results = [orjson.loads(x) for x in Path(manifest["results_path"]).read_bytes().splitlines()]
    assert [len(r["response"]["body"]["results"]) for r in results] == [2, 2]
    assert results[0]["response"]["body"]["results"][0]["document"]["text"] == "a brown fox"


def test_decorator_refuses_a_second_input() -> None:
    def make() -> list[dict[str, Any]]:
        return [{"prompt": "x"}]

    with pytest.raises(ValueError, match="exactly one of input_path or requests"):
        build(task.synth_openai_batch, make, model="m", output_path="/tmp/x", input_path="/tmp/in.jsonl")
