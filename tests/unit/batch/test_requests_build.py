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
