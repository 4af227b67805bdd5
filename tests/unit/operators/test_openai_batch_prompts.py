"""Prompts stay out of Airflow's rendered fields: ``requests`` renders as a count and the first ids."""

from __future__ import annotations

import jinja2
from airflow.sdk import DAG
from airflow.serialization.helpers import serialize_template_field
from airflow.serialization.serialized_objects import DagSerialization

from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator, RequestTemplate

SECRET_PROMPT = "patient Jane Roe, born 1961-02-03"
RECORDS = [{"id": f"rec-{i}", "text": f"{SECRET_PROMPT} #{i}"} for i in range(50)]


def make_op(requests) -> OpenAIBatchOperator:
    return OpenAIBatchOperator(task_id="t", requests=requests, model="gpt-4o-mini", output_path="/tmp/o",
                               template=RequestTemplate(prompt_template="Summarize {text}", id_field="id"))


def test_records_render_as_a_count_and_first_ids() -> None:
    op = make_op(RECORDS)
    stored = serialize_template_field(op.requests, "requests")
    assert stored == "50 record(s), not stored as a rendered field; ids: rec-0, rec-1, rec-2, ..."
    assert list(op.requests) == RECORDS and len(op.requests) == 50, "the operator still has every record"
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "messages": [{"role": "user", "content": SECRET_PROMPT}]}} for i in range(2)]
    assert serialize_template_field(make_op(lines).requests, "requests").endswith("ids: c0, c1")


def test_records_set_when_airflow_renders_an_xcom_reference_are_summarised_too() -> None:
    op = make_op([])
    op.requests = RECORDS  # rendering sets the field to what the XCom reference resolved to
    assert SECRET_PROMPT not in str(serialize_template_field(op.requests, "requests"))


def test_rendering_the_templates_stores_no_prompt() -> None:
    with DAG("d", schedule=None):
        op = make_op(RECORDS)
    op.render_template_fields({"ti": None, "run_id": "r"}, jinja2.Environment())
    assert SECRET_PROMPT not in str(serialize_template_field(op.requests, "requests"))
    assert len(list(op.requests)) == 50


def test_the_serialized_dag_holds_no_prompt() -> None:
    with DAG("d", schedule=None) as dag:
        make_op(RECORDS)
    assert SECRET_PROMPT not in str(DagSerialization.to_dict(dag))
