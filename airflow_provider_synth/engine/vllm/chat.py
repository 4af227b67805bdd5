"""``/v1/chat/completions`` in the vLLM runner the way vLLM's own ``run_batch`` answers it.

Runs in the vLLM interpreter only (it imports vLLM's OpenAI protocol models, parsers and fingerprint). The
runner's engine loop (:mod:`~airflow_provider_synth.engine.vllm.loop`) feeds the offline engine one request at a
time; this module maps one OpenAI chat body onto ``LLM.enqueue_chat`` and one finished ``RequestOutput`` back
onto the body ``run_batch`` writes, with the same vLLM pieces ``run_batch``'s ``OpenAIServingChat`` uses:

* the body is validated by vLLM's ``ChatCompletionRequest``, adjusted by the parser as the server's renderer
  does (``tool_choice`` "required" or named becomes a JSON schema for structured outputs) and turned into
  sampling parameters by its ``to_sampling_params`` (``response_format`` through structured outputs,
  ``logprobs``/``top_logprobs``, the model's generation-config defaults, ``stop_token_ids``...);
* ``tool_choice`` is checked as the server checks it ("auto" needs ``enable_auto_tool_choice`` and a
  ``tool_call_parser``; "required" and a named function need a ``tool_call_parser``);
* the answer goes through vLLM's ``ParserManager`` parser (``tool_call_parser``, ``reasoning_parser``) into
  ``message.tool_calls`` and ``message.reasoning``, ``finish_reason`` "tool_calls" as the server sets it;
* the body is vLLM's ``ChatCompletionResponse`` (``system_fingerprint``, ``stop_reason``, ``logprobs`` with
  ``top_logprobs``, ``prompt_logprobs``, ``usage`` with ``prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from airflow_provider_synth.batch.requests import CHAT
from airflow_provider_synth.engine.vllm.codecs import Codec
from airflow_provider_synth.engine.vllm.config import Request, RunnerConfig, emit

#: distinct request settings (a body less its messages) validated once each
_MAX_PREPARED = 1024


def _dumps_sorted(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _echo(choices: list[Any], last: dict[str, Any], role: str) -> None:
    """``echo``: each answer starts with the last message's content when that message is the answer's role."""
    prefix = last.get("content") or "" if last.get("role") == role else ""
    if isinstance(prefix, list):
        prefix = "\n".join(part.get("text", "") for part in prefix if isinstance(part, dict))
    for choice in choices:
        choice.message.content = prefix + (choice.message.content or "")


def _check_messages(messages: Any) -> None:
    """What the engine's renderer does not check itself: a list of messages, each with a role."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ValueError("messages must be a non-empty list of messages, each with a role")


class OpenAIChatCodec:
    """Chat requests through vLLM's OpenAI protocol; anything else through ``fallback``.

    :param llm: a loaded ``vllm.LLM``.
    :param cfg: the run's configuration (parsers, defaults, served names).
    :param fallback: the codec for the other endpoints (``/v1/completions``).
    """

    def __init__(self, llm: Any, cfg: RunnerConfig, fallback: Codec) -> None:
        from vllm.entrypoints.generate.base.serving import clamp_prompt_logprobs
        from vllm.entrypoints.openai.chat_completion import protocol
        from vllm.entrypoints.serve.engine.protocol import (
            CompletionTokenUsageInfo,
            PromptTokenUsageInfo,
            UsageInfo,
        )
        from vllm.entrypoints.serve.utils.fingerprint import get_system_fingerprint
        from vllm.parser import ParserManager
        from vllm.renderers.chat_utils import make_tool_call_id

        self.llm = llm
        self.cfg = cfg
        self.fallback = fallback
        self.protocol = protocol
        self.usage_cls = UsageInfo
        self.prompt_details_cls = PromptTokenUsageInfo
        self.completion_details_cls = CompletionTokenUsageInfo
        self.make_tool_call_id = make_tool_call_id
        self.clamp_prompt_logprobs = clamp_prompt_logprobs
        self.tokenizer = llm.get_tokenizer()
        model_config = llm.model_config
        #: generation-config defaults (``--generation-config auto``), as the server applies them
        self.defaults: dict[str, Any] = dict(model_config.get_diff_sampling_param())
        fields = protocol.ChatCompletionRequest.model_fields
        #: the run's default sampling values a body may also carry (vLLM names are the protocol's names)
        self.body_defaults = {k: v for k, v in cfg.sampling.items() if k in fields}
        self.extra_defaults = {k: v for k, v in cfg.sampling.items() if k not in fields}
        if self.extra_defaults:
            emit("warning", message="sampling defaults applied after the request's own values: "
                 + ", ".join(sorted(self.extra_defaults)))
        self.auto_tools = cfg.enable_auto_tool_choice
        self.parser_cls = ParserManager.get_parser(
            tool_parser_name=cfg.tool_call_parser, reasoning_parser_name=cfg.reasoning_parser,
            enable_auto_tools=self.auto_tools, model_name=model_config.model,
            is_harmony=model_config.hf_config.model_type == "gpt_oss", tokenizer=self.tokenizer)
        self.tool_parser_cls = getattr(self.parser_cls, "tool_parser_cls", None)
        self.fingerprint = get_system_fingerprint(llm.llm_engine.vllm_config)
        self.model_name = cfg.served_names()[0]
        self._prepared: dict[bytes, tuple[Any, Any]] = {}

    # ------------------------------------------------------------------------------------------- requests

    def enqueue(self, req: Request) -> tuple[list[str], Any]:
        if req.url != CHAT:
            return self.fallback.enqueue(req)
        body = {**self.body_defaults, **req.body} if self.body_defaults else req.body
        creq, params = self._prepare(body)
        ids = self.llm.enqueue_chat(body["messages"], params, use_tqdm=False, tools=body.get("tools"),
                                    chat_template_kwargs=creq.chat_template_kwargs,
                                    add_generation_prompt=creq.add_generation_prompt,
                                    continue_final_message=creq.continue_final_message)
        return list(ids), creq

    def _prepare(self, body: dict[str, Any]) -> tuple[Any, Any]:
        """The validated request and its sampling parameters. A batch file's lines mostly differ in their
        messages only: what the rest of a body gives is validated once and reused (the parameters copied per
        request); the messages themselves are rendered, and refused, by the engine's chat renderer. A body with
        tools is validated whole every time (tool parsers read the conversation's earlier tool calls)."""
        key = b"" if "tools" in body else _dumps_sorted({k: v for k, v in body.items() if k != "messages"})
        cached = self._prepared.get(key) if key else None
        if cached is not None:
            _check_messages(body.get("messages"))
            return cached[0], cached[1].clone()
        creq = self.protocol.ChatCompletionRequest.model_validate(body)
        if creq.stream:
            raise ValueError("Request must not be sent in stream mode")
        if creq.use_beam_search:  # refused rather than answered by sampling
            raise ValueError("use_beam_search is not supported by the batch runner")
        self._check_tool_choice(creq)
        if self.parser_cls is not None and (self.parser_cls.always_adjust_request or self.cfg.reasoning_parser
                                            or creq.tool_choice != "none"):
            # what the server's renderer does: a tool choice "required" or named becomes a JSON schema for
            # structured outputs (and reasoning parsers may adjust the request too)
            creq = self._parser(creq).adjust_request(request=creq)
        max_tokens = creq.max_completion_tokens if creq.max_completion_tokens is not None else creq.max_tokens
        if max_tokens is None:
            max_tokens = self.defaults.get("max_tokens")
        params = creq.to_sampling_params(max_tokens, self.defaults)
        for name, value in self.extra_defaults.items():
            setattr(params, name, value)
        if key and len(self._prepared) < _MAX_PREPARED:
            self._prepared[key] = (creq, params)
        return creq, params.clone()

    def _check_tool_choice(self, creq: Any) -> None:
        """The server's check (vLLM ``OnlineRenderer.render_chat``): a tool choice needs a parser."""
        choice = creq.tool_choice
        if self.tool_parser_cls is not None or choice in (None, "none"):
            return
        if choice == "auto":
            if not self.auto_tools:
                raise ValueError('"auto" tool choice requires --enable-auto-tool-choice and '
                                 "--tool-call-parser to be set")
            return
        desc = f'function "{choice.function.name}"' if hasattr(choice, "function") else f'"{choice}"'
        raise ValueError(f"tool_choice={desc} requires --tool-call-parser to be set")

    # ------------------------------------------------------------------------------------------- answers

    def body(self, req: Request, state: Any, out: Any, rid: str) -> dict[str, Any]:
        if req.url != CHAT:
            return self.fallback.body(req, state, out, rid)
        creq = state
        messages = req.body.get("messages") or [{}]
        # the server's role: the assistant's, or the last message's when it is continued
        role = "assistant" if creq.add_generation_prompt else str(messages[-1].get("role") or "assistant")
        choices = []
        reasoning_tokens = 0
        for output in out.outputs:
            choice, reasoning = self._choice(creq, output, out.prompt_token_ids, role)
            choices.append(choice)
            reasoning_tokens += reasoning
        if creq.echo:
            _echo(choices, messages[-1], role)
        prompt_tokens = len(out.prompt_token_ids or ())
        completion_tokens = sum(len(o.token_ids) for o in out.outputs)
        usage = self.usage_cls(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=self.prompt_details_cls(cached_tokens=out.num_cached_tokens or 0),
            completion_tokens_details=(self.completion_details_cls(reasoning_tokens=reasoning_tokens)
                                       if self.cfg.reasoning_parser else None))
        response = self.protocol.ChatCompletionResponse(
            id=f"chatcmpl-{rid}", created=int(time.time()), model=self.model_name, choices=choices,
            usage=usage, system_fingerprint=self.fingerprint,
            prompt_logprobs=self.clamp_prompt_logprobs(getattr(out, "prompt_logprobs", None)),
            prompt_token_ids=list(out.prompt_token_ids) if creq.return_token_ids else None)
        body: dict[str, Any] = response.model_dump(mode="json")
        return body

    def _choice(self, creq: Any, output: Any, prompt_token_ids: Any, role: str) -> tuple[Any, int]:
        """One choice, as ``OpenAIServingChat.chat_completion_full_generator`` builds it."""
        p = self.protocol
        logprobs = self._logprobs(creq, output) if creq.logprobs else None
        reasoning, content, calls, reasoning_tokens = None, output.text, [], 0
        if self.parser_cls is not None:
            parser = self._parser(creq)
            if prompt_token_ids is not None:
                parser.set_prompt_token_ids(prompt_token_ids)
            reasoning, content, calls = parser.parse(output.text, creq, enable_auto_tools=self.auto_tools,
                                                     model_output_token_ids=output.token_ids)
            reasoning_tokens = parser.count_reasoning_tokens(output.token_ids)
            if not creq.include_reasoning:
                reasoning, logprobs = None, None
        forced = isinstance(creq.tool_choice, p.ChatCompletionNamedToolChoiceParam) or creq.tool_choice == "required"
        auto_called = bool(not forced and calls and creq.tools and self.auto_tools and self.tool_parser_cls
                           and creq.tool_choice in ("auto", None))
        if forced or auto_called:
            tool_calls = [p.ToolCall(id=tc.id or self.make_tool_call_id(), function=tc) for tc in calls or []]
            message = p.ChatMessage(role=role, reasoning=reasoning, content=content or "" if forced else content,
                                    tool_calls=tool_calls)
        else:
            message = p.ChatMessage(role=role, reasoning=reasoning, content=content)
        # OpenAI: "tool_calls" for auto or required tool calls, "stop" for a named one
        finish = ("tool_calls" if auto_called or (creq.tool_choice == "required" and output.finish_reason == "stop")
                  else output.finish_reason or "stop")
        if creq.parallel_tool_calls is False and message.tool_calls:
            message.tool_calls = message.tool_calls[:1]
        choice = p.ChatCompletionResponseChoice(
            index=output.index, message=message, logprobs=logprobs, finish_reason=finish,
            stop_reason=output.stop_reason, token_ids=list(output.token_ids) if creq.return_token_ids else None)
        return choice, reasoning_tokens

    def _parser(self, creq: Any) -> Any:
        """A parser for one request (parsers keep state: one per request, and per choice)."""
        return self.parser_cls(self.tokenizer, creq.tools, chat_template_kwargs=creq.chat_template_kwargs,
                               model_config=self.llm.model_config)

    def _logprobs(self, creq: Any, output: Any) -> Any:
        """OpenAI ``logprobs.content``: each sampled token with its log-probability and the ``top_logprobs``
        most likely alternatives (``OpenAIServingChat._create_chat_logprobs``)."""
        p = self.protocol
        top_n = creq.top_logprobs
        content = []
        for token_id, step in zip(output.token_ids, output.logprobs or [], strict=False):
            chosen = step.get(token_id) if step else None
            if chosen is None:
                token = str(self.tokenizer.decode(token_id))
                content.append(p.ChatCompletionLogProbsContent(token=token, bytes=list(token.encode("utf-8",
                                                                                                   "replace"))))
                continue
            top = [p.ChatCompletionLogProb(token=(tok := self._decoded(tid, lp)), logprob=max(lp.logprob, -9999.0),
                                           bytes=list(tok.encode("utf-8", "replace")))
                   for i, (tid, lp) in enumerate(step.items()) if top_n == -1 or (top_n is not None and i < top_n)]
            raw = chosen.decoded_token
            content.append(p.ChatCompletionLogProbsContent(
                token=self._decoded(token_id, chosen), logprob=max(chosen.logprob, -9999.0),
                bytes=None if raw is None else list(raw.encode("utf-8", "replace")), top_logprobs=top))
        return p.ChatCompletionLogProbs(content=content)

    def _decoded(self, token_id: int, logprob: Any) -> str:
        text = logprob.decoded_token
        return text if text is not None else str(self.tokenizer.decode([token_id]))
