"""The OpenAI <-> Bedrock translations per model family, Bedrock's limits and prices (pure: no AWS)."""

from __future__ import annotations

import json

import pytest

from airflow_provider_synth.batch.results import parse_output_line
from airflow_provider_synth.runs.bedrock_mapping import (
    BedrockLimits,
    Unsupported,
    base_model_id,
    family_of,
    job_sizes,
    output_line,
    plan_jobs,
    prices_for,
    record_id,
    record_index,
    to_record,
)

CHAT = "/v1/chat/completions"


def body(**extra):
    return {"model": "m", "max_tokens": 50, "messages": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hi"}], **extra}


@pytest.mark.parametrize("model,family", [
    ("anthropic.claude-3-5-haiku-20241022-v1:0", "Anthropic Claude"),
    ("us.anthropic.claude-sonnet-4-20250514-v1:0", "Anthropic Claude"),
    ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.meta.llama3-1-8b-instruct-v1:0", "Meta Llama"),
    ("mistral.mixtral-8x7b-instruct-v0:1", "Mistral"),
    ("global.amazon.nova-pro-v1:0", "Amazon Nova"),
    ("amazon.titan-embed-text-v2:0", "Amazon Titan embeddings"),
])
def test_family_of_model_ids_profiles_and_arns(model, family):
    assert family_of(model).name == family


def test_an_unknown_model_is_refused_naming_the_families():
    with pytest.raises(Unsupported, match="no Bedrock batch translation for model 'cohere.command-r'.*Meta Llama"):
        family_of("cohere.command-r")


def test_claude_body_is_the_anthropic_translation_with_bedrock_s_version():
    native = to_record(family_of("anthropic.claude-3-haiku-20240307-v1:0"), "R0000000000", CHAT,
                       body(temperature=0.5, top_p=0.9, stop="END", user="u1"))["modelInput"]
    assert native == {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "system": "Be brief.",
                      "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.5, "top_p": 0.9,
                      "stop_sequences": ["END"]}


def test_claude_refusals_come_from_the_anthropic_translation():
    with pytest.raises(Unsupported, match="Anthropic Claude: .*logprobs"):
        family_of("anthropic.claude-3-haiku-20240307-v1:0").to_input(body(logprobs=True))


def test_llama_renders_llama3_s_template():
    native = family_of("meta.llama3-1-8b-instruct-v1:0").to_input(body(temperature=0.2))
    assert native == {"prompt": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n",
                      "max_gen_len": 50, "temperature": 0.2}


@pytest.mark.parametrize("extra,reason", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "no equivalent of tools"),
    ({"stop": ["x"]}, "no equivalent of stop"),
    ({"n": 3}, "n=3"),
    ({"response_format": {"type": "json_object"}}, "no equivalent of response_format"),
])
def test_llama_refuses_what_it_cannot_take(extra, reason):
    with pytest.raises(Unsupported, match=reason):
        family_of("meta.llama3-1-8b-instruct-v1:0").to_input(body(**extra))


def test_images_are_refused_by_the_text_families():
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
    with pytest.raises(Unsupported, match="text only.*'image_url'"):
        family_of("amazon.nova-lite-v1:0").to_input({"messages": [msg]})


def test_mistral_puts_the_system_text_in_the_first_turn():
    b = body(stop=["\n"])
    b["messages"] += [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]
    native = family_of("mistral.mistral-7b-instruct-v0:2").to_input(b)
    assert native == {"prompt": "<s>[INST] Be brief.\n\nHi [/INST] Hello</s>[INST] More [/INST]", "max_tokens": 50,
                      "stop": ["\n"]}


def test_nova_messages_v1_with_tools():
    tools = [{"type": "function", "function": {"name": "lookup", "description": "d", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}]
    native = family_of("amazon.nova-micro-v1:0").to_input(body(tools=tools, tool_choice="required", top_p=0.5))
    assert native["schemaVersion"] == "messages-v1" and native["system"] == [{"text": "Be brief."}]
    assert native["messages"] == [{"role": "user", "content": [{"text": "Hi"}]}]
    assert native["inferenceConfig"] == {"maxTokens": 50, "topP": 0.5}
    assert native["toolConfig"]["tools"][0]["toolSpec"]["name"] == "lookup"
    assert native["toolConfig"]["toolChoice"] == {"any": {}}


def test_titan_embeddings_take_one_text():
    fam = family_of("amazon.titan-embed-text-v2:0")
    assert fam.to_input({"model": "m", "input": ["a text"], "dimensions": 256}) == {"inputText": "a text",
                                                                                   "dimensions": 256}
    with pytest.raises(Unsupported, match="one text per record"):
        fam.to_input({"model": "m", "input": ["a", "b"]})
    with pytest.raises(Unsupported, match="serves /v1/embeddings"):
        to_record(fam, "R0000000000", CHAT, body())


def test_outputs_become_openai_lines_the_core_reads():
    llama = output_line(family_of("meta.llama3-1-8b-instruct-v1:0"), "c1", "meta.llama3", {
        "recordId": "R0000000000", "modelOutput": {"generation": "Hello", "prompt_token_count": 7,
                                                   "generation_token_count": 2, "stop_reason": "length"}})
    parsed = parse_output_line(llama)
    assert parsed.ok and parsed.custom_id == "c1" and parsed.usage == (7, 0, 2, 0, 9)
    choice = json.loads(llama)["response"]["body"]["choices"][0]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "length"}
    nova = json.loads(output_line(family_of("amazon.nova-lite-v1:0"), "c2", "nova", {
        "recordId": "R0000000001", "modelOutput": {"output": {"message": {"content": [
            {"toolUse": {"toolUseId": "t1", "name": "lookup", "input": {"q": "x"}}}]}}, "stopReason": "tool_use",
            "usage": {"inputTokens": 3, "outputTokens": 4}}}))
    call = nova["response"]["body"]["choices"][0]
    assert call["finish_reason"] == "tool_calls" and call["message"]["tool_calls"][0]["function"] == {
        "name": "lookup", "arguments": '{"q": "x"}'}


@pytest.mark.parametrize("code,retryable", [(429, True), (500, True), (503, True), (400, False)])
def test_record_errors_keep_their_status_for_the_one_retry_table(code, retryable):
    line = output_line(family_of("mistral.mistral-7b-instruct-v0:2"), "c", "m", {
        "recordId": "R0000000000", "error": {"errorCode": code, "errorMessage": "nope"}})
    parsed = parse_output_line(line)
    assert (parsed.ok, parsed.status_code, parsed.retryable, parsed.error_message) == (False, code, retryable, "nope")


def test_an_output_a_family_does_not_understand_is_a_retryable_failure():
    parsed = parse_output_line(output_line(family_of("anthropic.claude-3-haiku-20240307-v1:0"), "c", "m", {
        "recordId": "R0000000000", "modelOutput": {"unexpected": True}}))
    assert not parsed.ok and parsed.status_code == 502 and parsed.retryable


def test_record_ids_are_bedrock_s_eleven_alphanumerics_and_padding_is_not_one_of_ours():
    assert record_id(0) == "R0000000000" and len(record_id(49_999)) == 11
    assert record_index(record_id(1234)) == 1234 and record_index("P0000000001") is None


@pytest.mark.parametrize("total,size,expected", [
    (100, 1_000, [100]),
    (120_000, 1_000, [40_000] * 3),  # 3 jobs of 40,000: none below the minimum
    (50_001, 1_000, [25_001, 25_000]),
    (300, 3_000_000_000, [100, 100, 100]),  # the file-size quota splits too
])
def test_jobs_are_as_few_as_the_limits_allow_and_even(total, size, expected):
    limits = BedrockLimits()
    assert job_sizes(total, plan_jobs(total, size, limits)) == expected


def test_records_too_large_for_the_minimum_per_job_are_refused():
    with pytest.raises(Unsupported, match="need 3 jobs.*minimum of 100"):
        plan_jobs(150, 3_000_000_000, BedrockLimits())


def test_limits_keep_every_split_job_above_the_minimum():
    with pytest.raises(ValueError, match="at least twice min_records"):
        BedrockLimits(min_records=100, max_records=150)


def test_profiles_and_arns_are_priced_as_their_model():
    model = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    assert base_model_id(model) == "anthropic.claude-3-5-haiku-20241022-v1:0"
    assert prices_for(model)[model] == prices_for(model)[base_model_id(model)]
    assert prices_for(model, {model: (1.0, 0.1, 2.0)})[model].output == 2.0
