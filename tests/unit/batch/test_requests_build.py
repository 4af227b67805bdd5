from __future__ import annotations

import io

import pydantic
import pytest

from airflow_provider_synth.batch import build_requests, chat_body, write_requests
from airflow_provider_synth.batch.requests import response_format_for, user_message


class Quiz(pydantic.BaseModel):
    question: str
    answer: str
    difficulty: int = 1


def test_template_records_build_deterministic_bytes() -> None:
    recs = [{"id": "a", "topic": "chess"}, {"id": "b", "topic": "go"}]

    def build() -> bytes:
        buf = io.BytesIO()
        write_requests(build_requests(recs, model="gpt-4o-mini", prompt_template="About {topic}",
                                      id_field="id", system="Be brief", params={"temperature": 0}), buf)
        return buf.getvalue()

    first = build()
    assert first == build()
    lines = first.splitlines()
    assert lines[0] == (b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":'
                        b'"gpt-4o-mini","messages":[{"role":"system","content":"Be brief"},{"role":"user",'
                        b'"content":"About chess"}],"temperature":0}}')


def test_index_ids_and_missing_id_field() -> None:
    reqs = list(build_requests([{"prompt": "x"}, {"prompt": "y"}], model="m"))
    assert [r["custom_id"] for r in reqs] == ["request-0", "request-1"]
    with pytest.raises(ValueError, match="no id field 'key'"):
        list(build_requests([{"prompt": "x"}], model="m", id_field="key"))


def test_builder_images_tools_and_pydantic_response_format() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    reqs = list(build_requests(
        [{"q": "what is this?", "img": "data:image/png;base64,AAAA"}], model="gpt-4o",
        builder=lambda r: [user_message(r["q"], images=[r["img"]], detail="low")],
        tools=tools, response_format=Quiz))
    body = reqs[0]["body"]
    assert body["messages"][0]["content"][1] == {"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    assert body["tools"] == tools
    schema = body["response_format"]["json_schema"]
    assert schema["name"] == "Quiz" and schema["strict"] is True
    assert schema["schema"]["required"] == ["question", "answer", "difficulty"]
    assert schema["schema"]["additionalProperties"] is False


def test_other_endpoints() -> None:
    emb = list(build_requests([{"text": ["a", "b"]}], model="text-embedding-3-small", endpoint="/v1/embeddings"))
    assert emb[0]["body"] == {"model": "text-embedding-3-small", "input": ["a", "b"]}
    resp = list(build_requests([{"prompt": "hi"}], model="gpt-5", endpoint="/v1/responses", system="sys"))
    assert resp[0]["body"] == {"model": "gpt-5", "input": "hi", "instructions": "sys"}
    comp = list(build_requests([{"prompt": "hi"}], model="gpt-3.5-turbo-instruct", endpoint="/v1/completions"))
    assert comp[0]["body"]["prompt"] == "hi"
    with pytest.raises(ValueError, match="unsupported endpoint"):
        list(build_requests([{}], model="m", endpoint="/v1/images"))  # type: ignore[arg-type]


def test_chat_body_and_json_schema_dict() -> None:
    body = chat_body("m", [{"role": "user", "content": "x"}], response_format={"type": "json_object"}, seed=3)
    assert body["response_format"] == {"type": "json_object"} and body["seed"] == 3
    rf = response_format_for({"title": "T", "type": "object", "properties": {"a": {"type": "string"}}})
    assert rf["json_schema"]["name"] == "T" and rf["json_schema"]["schema"]["required"] == ["a"]


# -- template errors name the record, the field, the template and the brace escape (issue 21) ----------------

def _template_error(template: str, records: list[dict], **kwargs) -> str:
    from airflow_provider_synth.batch.requests import TemplateError

    with pytest.raises(TemplateError) as err:
        list(build_requests(records, model="gpt-4o-mini", prompt_template=template, **kwargs))
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working
    return str(err.value)


def test_a_missing_field_names_record_index_id_field_template_and_brace_escape() -> None:
    """On the old main: a bare ``KeyError: 'isue_type'``."""
    records = [{"id": "doc-1", "issue_type": "bug", "text": "a"}, {"id": "doc-7", "text": "b"}]
    message = _template_error("Classify this {issue_type}: {text}", records, id_field="id")
    assert "record 1 (id 'doc-7') has no field 'issue_type' (its fields: id, text)" in message
    assert "'Classify this {issue_type}: {text}'" in message
    assert "'{{' and '}}'" in message


def test_a_json_example_in_a_prompt_says_to_double_its_braces() -> None:
    """On the old main: ``KeyError: '"question"'``, nothing about escaping."""
    message = _template_error('Reply as {"question": "...", "answer": "..."} about {topic}', [{"topic": "chess"}])
    assert "record 0 (id 'request-0') has no field '\"question\"'" in message
    assert "looks like JSON" in message and "'{{' and '}}'" in message


@pytest.mark.parametrize(("template", "expected"), [
    ("a lone } brace", "Single '}' encountered"),
    ("a lone { brace", "is not a valid template"),
    ("positional {} field", "has a positional field '{}'"),
])
def test_a_malformed_template_fails_before_any_record_naming_the_template(template, expected) -> None:
    def records():
        raise AssertionError("no record is read for a template that cannot work")
        yield {}

    message = _template_error(template, records())  # type: ignore[arg-type]
    assert expected in message and repr(template) in message and "'{{' and '}}'" in message


def test_doubled_braces_are_literal_text() -> None:
    (line,) = build_requests([{"topic": "chess"}], model="m", prompt_template='As {{"q": "..."}} on {topic}')
    assert line["body"]["messages"][-1]["content"] == 'As {"q": "..."} on chess'


def test_a_format_spec_the_value_cannot_take_names_the_record() -> None:
    message = _template_error("level {level:d}", [{"id": "x1", "level": "high"}], id_field="id")
    assert "record 0 (id 'x1') cannot be rendered: ValueError" in message
