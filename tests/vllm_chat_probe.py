"""The runner's chat codec with vLLM's real protocol models, tool and reasoning parsers, and no engine.

Run with the vLLM interpreter and the repository on the path (tests/integration/test_vllm_engine.py does)::

    PYTHONPATH=. .venv-vllm/bin/python tests/vllm_chat_probe.py TOKENIZER_DIR

The engine is replaced by a stub that records what the codec adds and by ``RequestOutput``-shaped answers
with fixed text, so tool-call and reasoning parsing are checked on text a random model would never write.
Exits non-zero on the first failed check; prints ``ok`` at the end.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace
from typing import Any

from airflow_provider_synth.batch.requests import CHAT
from airflow_provider_synth.engine.vllm.chat import OpenAIChatCodec
from airflow_provider_synth.engine.vllm.config import Request, RunnerConfig

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


class StubLLM:
    """What the codec reads of ``vllm.LLM``: a tokenizer, the model config, and ``enqueue_chat``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.model_config = SimpleNamespace(model="tiny", hf_config=SimpleNamespace(model_type="llama"),
                                            get_diff_sampling_param=lambda: {"repetition_penalty": 1.1})
        self.llm_engine = SimpleNamespace(vllm_config=SimpleNamespace(compute_hash=lambda: "0123456789"))
        self.added: list[tuple[Any, Any, dict[str, Any]]] = []

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def enqueue_chat(self, messages: Any, params: Any, **kwargs: Any) -> list[str]:
        self.added.append((messages, params, kwargs))
        return [f"{len(self.added) - 1}-0a1b2c3d"]


def output(text: str, tokenizer: Any, finish: str = "stop", logprobs: Any = None) -> Any:
    ids = tokenizer.encode(text, add_special_tokens=False)
    choice = SimpleNamespace(index=0, text=text, token_ids=ids, finish_reason=finish, stop_reason=None,
                             logprobs=logprobs)
    return SimpleNamespace(request_id="0", prompt_token_ids=[1, 2, 3], outputs=[choice], num_cached_tokens=2)


def chat(cid: str, **body: Any) -> Request:
    return Request(cid, CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body})


def expect_refused(codec: OpenAIChatCodec, req: Request, fragment: str) -> None:
    try:
        codec.enqueue(req)
    except ValueError as exc:
        assert fragment in str(exc), exc
        return
    raise AssertionError(f"{req.custom_id} was not refused")


def check_requests(tokenizer: Any) -> None:
    llm = StubLLM(tokenizer)
    cfg = RunnerConfig(input="-", output="-", model="/m/tiny", served_model_names=["tiny"],
                       sampling={"temperature": 0.3, "max_tokens": 9, "min_tokens": 1})
    codec = OpenAIChatCodec(llm, cfg, fallback=None)  # type: ignore[arg-type]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    codec.enqueue(chat("schema", temperature=0.9, logprobs=True, top_logprobs=2,
                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    _, params, kwargs = llm.added[-1]
    assert params.temperature == 0.9 and params.max_tokens == 9 and params.min_tokens == 1, params
    assert params.repetition_penalty == 1.1, "the model's generation config is a default"
    assert params.logprobs == 2 and params.structured_outputs.json == schema, params
    codec.enqueue(chat("obj", max_completion_tokens=4, response_format={"type": "json_object"}))
    assert llm.added[-1][1].structured_outputs.json_object and llm.added[-1][1].max_tokens == 4
    assert llm.added[-1][1].temperature == 0.3
    # the same settings again: validated once, the parameters copied for each request
    codec.enqueue(chat("obj2", max_completion_tokens=4, response_format={"type": "json_object"}))
    assert llm.added[-1][1] is not llm.added[-2][1] and llm.added[-1][1].max_tokens == 4
    assert llm.added[-1][1].structured_outputs.json_object
    bad = chat("bad", max_completion_tokens=4, response_format={"type": "json_object"})
    bad.body["messages"] = [{"content": "no role"}]
    expect_refused(codec, bad, "each with a role")
    expect_refused(codec, chat("auto", tools=TOOLS, tool_choice="auto"), '"auto" tool choice requires')
    expect_refused(codec, chat("req", tools=TOOLS, tool_choice="required"), "requires --tool-call-parser")
    expect_refused(codec, chat("stream", stream=True), "stream mode")
    expect_refused(codec, chat("beam", use_beam_search=True), "use_beam_search")
    codec.enqueue(chat("none", tools=TOOLS, tool_choice="none"))
    assert llm.added[-1][2]["tools"] == TOOLS  # the server keeps tools in the prompt for "none"

    parsed = OpenAIChatCodec(llm, RunnerConfig(input="-", output="-", model="tiny", tool_call_parser="pythonic",
                                               enable_auto_tool_choice=True), fallback=None)  # type: ignore[arg-type]
    parsed.enqueue(chat("required", tools=TOOLS, tool_choice="required"))
    assert llm.added[-1][1].structured_outputs.json["type"] == "array", "required: a JSON list of calls"
    parsed.enqueue(chat("named", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert llm.added[-1][1].structured_outputs.json == TOOLS[0]["function"]["parameters"]


def check_answers(tokenizer: Any) -> None:
    from vllm.logprobs import Logprob

    llm = StubLLM(tokenizer)
    cfg = RunnerConfig(input="-", output="-", model="tiny", tool_call_parser="pythonic",
                       enable_auto_tool_choice=True, reasoning_parser="deepseek_r1")
    codec = OpenAIChatCodec(llm, cfg, fallback=None)  # type: ignore[arg-type]
    auto = chat("auto", tools=TOOLS, tool_choice="auto")
    _, state = codec.enqueue(auto)
    body = codec.body(auto, state, output("<think>it is sunny</think>[get_weather(city='Paris')]", tokenizer),
                      "vllm-1")
    message, choice = body["choices"][0]["message"], body["choices"][0]
    assert message["reasoning"] == "it is sunny", message
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather", call
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["finish_reason"] == "tool_calls" and body["system_fingerprint"].startswith("vllm-")
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0} or \
        "reasoning_tokens" in body["usage"]["completion_tokens_details"]

    named = chat("named", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    _, state = codec.enqueue(named)
    body = codec.body(named, state, output('</think>{"city": "Oslo"}', tokenizer), "vllm-2")
    choice = body["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}', choice
    assert choice["finish_reason"] == "stop", "a named tool call finishes with stop, as in OpenAI's API"

    cont = Request("cont", CHAT, {"model": "tiny", "echo": True, "add_generation_prompt": False,
                                  "continue_final_message": True,
                                  "messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "Once upon"}]})
    _, state = codec.enqueue(cont)
    assert llm.added[-1][2]["continue_final_message"] and not llm.added[-1][2]["add_generation_prompt"]
    message = codec.body(cont, state, output("</think> a time", tokenizer), "vllm-4")["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == "Once upon a time", message

    plain = chat("plain", logprobs=True, top_logprobs=2)
    _, state = codec.enqueue(plain)
    ids = tokenizer.encode("</think>fox dog", add_special_tokens=False)
    steps = [{tid: Logprob(-0.5, 1, tokenizer.decode([tid])), tid + 1: Logprob(-1.5, 2, "x"),
              tid + 2: Logprob(-2.5, 3, "y")} for tid in ids]
    body = codec.body(plain, state, output("</think>fox dog", tokenizer, logprobs=steps), "vllm-3")
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == len(ids) and all(len(c["top_logprobs"]) == 2 for c in content), content
    assert content[0]["logprob"] == -0.5 and content[0]["top_logprobs"][1]["token"] == "x"


def main(tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<think>", "</think>"])  # what the deepseek_r1 reasoning parser looks for
    check_requests(tokenizer)
    check_answers(tokenizer)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
