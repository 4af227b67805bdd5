"""/v1/moderations as a batch endpoint: built from records, validated before anything is sent, refused where the
backend cannot serve it (vLLM, Cortex, Azure), answered by the local server under a rule tests steer, extracted
as flags and scores; image and video endpoints refused with their reason."""

from __future__ import annotations

import json

import openai
import pytest

from airflow_provider_synth.batch.errors import InvalidRequestsError
from airflow_provider_synth.batch.extract import extract_moderation, flagged_ids, iter_moderations
from airflow_provider_synth.batch.requests import (
    AZURE_ENDPOINTS,
    MODERATIONS,
    OPENAI_ENDPOINTS,
    VLLM_ENDPOINTS,
    build_requests,
    moderation_input,
)
from airflow_provider_synth.batch.usage import Usage, cost_usd
from airflow_provider_synth.batch.validate import validate_requests

MODEL = "omni-moderation-latest"


def line(cid: str, value: object, model: str = MODEL) -> dict:
    return {"custom_id": cid, "method": "POST", "url": MODERATIONS, "body": {"model": model, "input": value}}


def test_records_become_moderation_requests_with_text_and_images() -> None:
    records = [{"id": "a", "text": "a kind reply"}, {"id": "b", "text": "see the photo", "images": ["https://x/1.png"]},
               {"id": "c", "input": ["one", "two"]}]
    reqs = list(build_requests(records, model=MODEL, endpoint="/moderations", id_field="id"))
    assert [r["url"] for r in reqs] == [MODERATIONS] * 3
    assert reqs[0]["body"] == {"model": MODEL, "input": "a kind reply"}
    assert reqs[1]["body"]["input"] == [{"type": "text", "text": "see the photo"},
                                        {"type": "image_url", "image_url": {"url": "https://x/1.png"}}]
    assert reqs[2]["body"]["input"] == ["one", "two"]
    templated = list(build_requests([{"q": "hi", "a": "there"}], model=MODEL, endpoint=MODERATIONS,
                                    prompt_template="Q: {q}\nA: {a}"))
    assert templated[0]["body"]["input"] == "Q: hi\nA: there"
    assert validate_requests([*reqs, *templated]).endpoint == MODERATIONS
    with pytest.raises(ValueError, match="system, response_format and tools do not apply"):
        list(build_requests(records, model=MODEL, endpoint=MODERATIONS, system="be strict"))
    with pytest.raises(ValueError, match="'input'/'text' field"):
        list(build_requests([{"other": 1}], model=MODEL, endpoint=MODERATIONS))
    assert moderation_input("t") == "t"


def test_bad_moderation_bodies_are_refused_by_line_and_id() -> None:
    bad = [line("empty", ""), line("num", 5), line("part", [{"type": "audio", "data": "x"}]),
           line("img-text-model", [{"type": "image_url", "image_url": {"url": "u"}}], model="text-moderation-latest"),
           {**line("stream", "x"), "body": {"model": MODEL, "input": "x", "stream": True}}]
    with pytest.raises(InvalidRequestsError) as err:
        validate_requests(bad, name="mod.jsonl")
    text = str(err.value)
    assert "mod.jsonl:1 custom_id='empty': body.input is missing or empty" in text
    assert "mod.jsonl:2 custom_id='num': body.input must be a string" in text
    assert "mod.jsonl:3 custom_id='part': body.input[0] must be" in text
    assert "mod.jsonl:4 custom_id='img-text-model': body.input[0] is an image: only omni-moderation" in text
    assert "mod.jsonl:5 custom_id='stream': body.stream is true" in text


@pytest.mark.parametrize("served", [VLLM_ENDPOINTS, AZURE_ENDPOINTS])
def test_backends_without_moderations_refuse_them_clearly(served: tuple[str, ...]) -> None:
    assert MODERATIONS in OPENAI_ENDPOINTS and MODERATIONS not in served
    with pytest.raises(InvalidRequestsError, match=r"in.jsonl:1 custom_id='m': unsupported url '/v1/moderations' "
                                                   r"\(only OpenAI's Batch API serves it"):
        validate_requests([line("m", "hello")], name="in.jsonl", endpoints=served)


def test_cortex_refuses_moderations_before_staging() -> None:
    from airflow_provider_synth.runs import cortex_mapping as cortex

    with pytest.raises(InvalidRequestsError, match="custom_id='m'.*Cortex runs /v1/chat/completions requests only"):
        cortex.check_requests([line("m", "hello")], name="in.jsonl")


@pytest.mark.parametrize(("url", "why"), [("/v1/images/generations", "priced per image"),
                                          ("/v1/images/edits", "image edits are not supported"),
                                          ("/v1/videos", "Videos API shut down")])
def test_image_and_video_endpoints_are_refused_with_their_reason(url: str, why: str) -> None:
    with pytest.raises(InvalidRequestsError, match=why):
        validate_requests([{"custom_id": "x", "method": "POST", "url": url, "body": {"model": "m", "prompt": "p"}}])


def test_moderations_are_free_and_counted() -> None:
    usage = Usage(requests=3)
    assert cost_usd(usage, "omni-moderation-latest") == 0.0
    assert cost_usd(usage, "omni-moderation-2024-09-26") == 0.0
    assert cost_usd(usage, "text-moderation-stable", batch=False) == 0.0


def test_local_server_answers_moderations_under_a_rule_tests_steer(batch_server, tmp_path) -> None:
    client = openai.OpenAI(api_key="sk-mod", base_url=batch_server.base_url, max_retries=0)
    calm = client.moderations.create(model=MODEL, input="Thanks, your parcel is on its way.")
    rude = client.moderations.create(model=MODEL, input=["Thanks!", "You idiot."])
    marked = client.moderations.create(model=MODEL, input=[
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://x/[flag:violence].png"}}])
    assert not calm.results[0].flagged and max(calm.results[0].category_scores.model_dump().values()) < 0.05
    assert [r.flagged for r in rude.results] == [False, True] and rude.results[1].categories.harassment
    assert marked.results[0].flagged and marked.results[0].categories.violence
    assert marked.results[0].category_applied_input_types.violence == ["text", "image"]
    # the same text always scores the same
    again = client.moderations.create(model=MODEL, input="Thanks, your parcel is on its way.")
    assert again.results[0].category_scores == calm.results[0].category_scores

    results = tmp_path / "results.jsonl"
    rows = [{"custom_id": cid, "response": {"status_code": 200, "body": body.model_dump()}, "error": None}
            for cid, body in (("calm", calm), ("rude", rude), ("marked", marked))]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert flagged_ids(results) == {"rude", "marked"}
    assert flagged_ids(results, threshold=0.04) >= {"rude", "marked"}
    verdicts = {m.custom_id: m for m in iter_moderations(results)}
    assert verdicts["rude"].categories == ("harassment",) and verdicts["rude"].scores["harassment"] == 0.9
    assert extract_moderation({"custom_id": "x", "response": {"body": {"choices": []}}}) is None
