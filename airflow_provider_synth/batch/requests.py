"""Build OpenAI batch request lines from records.

A request line is ``{"custom_id", "method": "POST", "url", "body"}``. Custom ids are deterministic (taken from
a key field the user names, or from the record's stable index), and the JSON is serialized with a fixed key
order, so the same records always build a byte-identical file.
"""

from __future__ import annotations

import copy
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal, get_args

from airflow_provider_synth.batch.errors import BatchCoreError
from airflow_provider_synth.batch.jsonl import write_jsonl

Endpoint = Literal["/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/completions", "/v1/moderations"]
ENDPOINTS: tuple[str, ...] = get_args(Endpoint)
CHAT: Endpoint = "/v1/chat/completions"
EMBEDDINGS: Endpoint = "/v1/embeddings"
RESPONSES: Endpoint = "/v1/responses"
COMPLETIONS: Endpoint = "/v1/completions"
#: OpenAI's moderation classifier: a safety filter over generated rows (OpenAI's Batch API only; free today).
MODERATIONS: Endpoint = "/v1/moderations"

#: vLLM's scoring endpoints (cross-encoders), served offline by the vLLM backend only: the Batch APIs refuse
#: them. ``run_batch`` takes ``/score``, ``/v1/score``, ``/rerank``, ``/v1/rerank`` and ``/v2/rerank``.
SCORE = "/v1/score"
RERANK = "/v1/rerank"
#: What each backend serves, in canonical form. A line's endpoint outside its backend's set is invalid.
OPENAI_ENDPOINTS: tuple[str, ...] = ENDPOINTS
#: Azure's global batch serves no moderations (Azure has no moderation endpoint; its content filter is built in).
AZURE_ENDPOINTS: tuple[str, ...] = (CHAT, EMBEDDINGS, RESPONSES, COMPLETIONS)
VLLM_ENDPOINTS: tuple[str, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, SCORE, RERANK)
#: Other spellings of an endpoint -> its canonical form (beside Azure's form without ``/v1``).
_ALIASES: dict[str, str] = {"/v2/rerank": RERANK}
#: Endpoints the OpenAI Batch API takes that this provider refuses, and why (a line naming one is invalid).
UNSUPPORTED_ENDPOINTS: dict[str, str] = {
    "/v1/images/generations": "image generation is not supported yet: its answers are images priced per image, "
                              "not tokens, and land as base64 files; run it outside this provider",
    "/v1/images/edits": "image edits are not supported yet (images priced per image, multipart inputs)",
    "/v1/videos": "OpenAI's Videos API shut down on 2026-09-24: batches no longer accept /v1/videos",
}

#: Azure's own spelling of the endpoints in batch lines and ``batches.create`` (its dated API versions' docs
#: write ``"url": "/chat/completions"``); Azure's v1 API and OpenAI take the ``/v1/...`` form.
AZURE_FORMS: dict[str, str] = {e: e.removeprefix("/v1") for e in ENDPOINTS}
UrlForm = Literal["openai", "azure"]


def canonical_url(url: str, served: Sequence[str] = OPENAI_ENDPOINTS) -> str | None:
    """The endpoint a line's ``url`` names, in its ``/v1/...`` form, if ``served`` holds it, else ``None``.
    Accepted spellings: the ``/v1/...`` form, the form without ``/v1`` (Azure's ``/chat/completions``; vLLM's
    ``/score`` and ``/rerank``) and ``/v2/rerank``.

    :param url: the line's ``url``.
    :param served: the canonical endpoints the backend serves (:data:`OPENAI_ENDPOINTS`,
        :data:`VLLM_ENDPOINTS`).
    """
    for candidate in (url, "/v1" + url, _ALIASES.get(url)):
        if candidate in served:
            return candidate
    return None


def service_url(endpoint: str, form: UrlForm) -> str:
    """``endpoint`` in the form a service expects: ``openai`` (``/v1/chat/completions``) or ``azure``
    (``/chat/completions``)."""
    canonical = canonical_url(endpoint) or endpoint
    return AZURE_FORMS.get(canonical, canonical) if form == "azure" else canonical


#: The body field that carries a record's text, per endpoint.
INPUT_FIELD: dict[str, str] = {CHAT: "messages", EMBEDDINGS: "input", RESPONSES: "input", COMPLETIONS: "prompt",
                               MODERATIONS: "input", RERANK: "documents", SCORE: "text_2"}
#: The body fields of one scoring request, as vLLM's server reads them: rerank takes ``query`` and
#: ``documents``; score takes the first pair present.
RERANK_FIELDS = ("query", "documents")
SCORE_FIELDS = (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents"), ("queries", "items"))


def scoring_pairs(endpoint: str, body: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    """The (query, document) pairs of one score or rerank body (``endpoint``: :data:`SCORE` or :data:`RERANK`),
    paired as vLLM's server pairs them: one with one, one with many, or as many with as many.

    :raises ValueError: the body lacks its fields or cannot be paired.
    """
    if endpoint == RERANK:
        left, right = body.get("query"), body.get("documents")
        if left is None or right is None:
            raise ValueError("a rerank body needs query and documents")
    else:
        for a, b in SCORE_FIELDS:
            if a in body and b in body:
                left, right = body[a], body[b]
                break
        else:
            raise ValueError("a score body needs text_1 and text_2 (or queries and documents)")
    lefts = left if isinstance(left, list) else [left]
    rights = right if isinstance(right, list) else [right]
    if not rights or len(lefts) not in (1, len(rights)):
        raise ValueError(f"cannot pair {len(lefts)} quer(ies) with {len(rights)} document(s): score pairs one "
                         "with many, or as many with as many")
    lefts = lefts * len(rights) if len(lefts) == 1 else lefts
    if any(v is None for v in (*lefts, *rights)):
        raise ValueError("a score or rerank text is null")
    return lefts, rights

Builder = Callable[[Mapping[str, Any]], Any]


def make_request(custom_id: str, url: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Return one batch request line as a dict.

    :param custom_id: the request's id, unique in the batch; results are matched by it.
    :param url: one of :data:`ENDPOINTS`.
    :param body: the request body, as the endpoint takes it.
    """
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": dict(body)}


def user_message(text: str, *, images: Sequence[str] = (), detail: str | None = None) -> dict[str, Any]:
    """A user message; with ``images`` (URLs or ``data:`` URIs) the content becomes text and image parts."""
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for url in images:
        image: dict[str, Any] = {"url": url}
        if detail:
            image["detail"] = detail
        parts.append({"type": "image_url", "image_url": image})
    return {"role": "user", "content": parts}


def moderation_input(text: str, *, images: Sequence[str] = ()) -> str | list[dict[str, Any]]:
    """A ``/v1/moderations`` ``input``: the text alone, or (``omni-moderation-*`` models) text and image parts.

    :param text: the text to classify (e.g. a generated answer).
    :param images: image URLs or ``data:`` URIs classified with it.
    """
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return parts


def response_format_for(schema: Any, *, name: str | None = None, strict: bool = True) -> dict[str, Any]:
    """Turn a pydantic model class or a JSON-schema dict into a chat ``response_format``.

    A model class is converted with its own JSON schema, made strict the way OpenAI's structured outputs
    require (every property required, no additional properties).

    :param schema: a pydantic ``BaseModel`` subclass, a JSON schema dict, or a ready ``response_format`` dict.
    :param name: the schema name; defaults to the model class name.
    :param strict: ask the service to enforce the schema.
    """
    if isinstance(schema, Mapping):
        if schema.get("type") in ("json_schema", "json_object", "text"):
            return dict(schema)
        json_schema = copy.deepcopy(dict(schema))
        schema_name = name or str(json_schema.get("title") or "response")
    else:
        json_schema = schema.model_json_schema()
        schema_name = name or schema.__name__
    if strict:
        _make_strict(json_schema)
    return {"type": "json_schema", "json_schema": {"name": schema_name, "schema": json_schema, "strict": strict}}


def _make_strict(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node["additionalProperties"] = False
            node["required"] = list(node["properties"])
        node.pop("default", None)
        for value in node.values():
            _make_strict(value)
    elif isinstance(node, list):
        for item in node:
            _make_strict(item)


def chat_body(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    response_format: Any = None,
    **params: Any,
) -> dict[str, Any]:
    """A ``/v1/chat/completions`` body.

    :param model: the model (on Azure, the deployment name).
    :param messages: system, developer, user, assistant and tool messages.
    :param tools: function tools, passed through.
    :param response_format: a pydantic model class, a JSON schema or a ``response_format`` dict.
    :param params: any other body field (``temperature``, ``max_completion_tokens``, ``seed``...).
    """
    body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages]}
    if tools:
        body["tools"] = [dict(t) for t in tools]
    if response_format is not None:
        body["response_format"] = response_format_for(response_format)
    body.update(params)
    return body


def custom_id_for(record: Mapping[str, Any], index: int, *, id_field: str | None, prefix: str) -> str:
    """The custom_id of a record: ``str(record[id_field])`` when a key field is named, else prefix + index."""
    if id_field is None:
        return f"{prefix}{index}"
    try:
        value = record[id_field]
    except KeyError:
        raise ValueError(f"record {index} has no id field {id_field!r}") from None
    if value is None or value == "":
        raise ValueError(f"record {index} has an empty id field {id_field!r}")
    return str(value)


class TemplateError(BatchCoreError, ValueError):
    """A ``prompt_template`` that cannot be filled from a record (raised before anything is uploaded)."""


#: how to write a brace that is text, not a field: every template error ends with it
BRACE_HINT = ("A literal brace in a template is written doubled: '{{' and '}}' (a JSON example in a prompt: "
              "'Answer as {{\"question\": \"...\"}}').")


def _shown(template: str, limit: int = 160) -> str:
    return repr(template if len(template) <= limit else template[:limit] + "...")


def check_template(template: str) -> None:
    """Check a ``str.format`` template's syntax once, before any record is rendered.

    :raises TemplateError: a lone brace or a malformed field, with the template and :data:`BRACE_HINT`.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise TemplateError(f"prompt_template {_shown(template)} is not a valid template ({exc}). "
                            f"{BRACE_HINT}") from None
    positional = [f for f in fields if f == "" or f.isdigit()]
    if positional:
        raise TemplateError(f"prompt_template {_shown(template)} has a positional field "
                            f"'{{{positional[0]}}}': fields are filled from each record by name, e.g. '{{topic}}'. "
                            f"{BRACE_HINT}")


def render_template(template: str, record: Mapping[str, Any], index: int, custom_id: str | None = None) -> str:
    """``template.format_map(record)``, with an error that names the record, the field and the template.

    :param template: the ``str.format`` template.
    :param record: the record's fields.
    :param index: the record's 0-based position in the input.
    :param custom_id: the record's id (its ``custom_id``), for the message.
    :raises TemplateError: a missing field (with the record's fields) or a value the field's format spec
        cannot take.
    """
    try:
        return template.format_map(record)
    except KeyError as exc:
        field = str(exc.args[0]) if exc.args else "?"
        cause = f"has no field {field!r} (its fields: {', '.join(map(str, list(record)[:20])) or 'none'})"
        if any(c in field for c in "\"': \n"):
            cause += f"; {{{field}}} looks like JSON or prose inside braces, not a field name"
        err = cause
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        err = f"cannot be rendered: {type(exc).__name__}: {exc}"
    who = f"record {index}" + (f" (id {custom_id!r})" if custom_id is not None else "")
    raise TemplateError(f"prompt_template {_shown(template)}: {who} {err}. {BRACE_HINT}") from None


def _body_from(value: Any, endpoint: str, model: str, system: str | None) -> dict[str, Any]:
    """Normalize what a builder returned (a body, a list of messages/inputs, or a text) into a body."""
    field = INPUT_FIELD[endpoint]
    if isinstance(value, Mapping):
        body = dict(value)
    elif endpoint == CHAT and isinstance(value, str):
        body = {"messages": [{"role": "user", "content": value}]}
    else:
        body = {field: value if not isinstance(value, tuple) else list(value)}
    body.setdefault("model", model)
    if system is not None and endpoint == CHAT and "messages" in body:
        if not body["messages"] or body["messages"][0].get("role") not in ("system", "developer"):
            body["messages"] = [{"role": "system", "content": system}, *body["messages"]]
    if endpoint == RESPONSES and system is not None:
        body.setdefault("instructions", system)
    # model first: a stable, readable key order
    return {"model": body.pop("model"), **body}


def _default_value(record: Mapping[str, Any], endpoint: str, template: str | None, index: int = 0,
                   custom_id: str | None = None) -> Any:
    if endpoint in (SCORE, RERANK):  # a body of the record's scoring fields
        fields = RERANK_FIELDS if endpoint == RERANK else tuple(f for pair in SCORE_FIELDS for f in pair)
        body = {f: record[f] for f in fields if f in record}
        if not body:
            raise ValueError(f"cannot build a {endpoint} request from record keys {sorted(record)}: give a builder "
                             f"or the fields {', '.join(dict.fromkeys(fields))}")
        return body
    if endpoint == MODERATIONS:
        text = template.format_map(record) if template is not None else record.get("input", record.get("text"))
        if text is None and not record.get("images"):
            raise ValueError(f"cannot build a {endpoint} request from record keys {sorted(record)}: give a "
                             "prompt_template, a builder, or an 'input'/'text' field (and 'images' for image URLs)")
        if isinstance(text, list):
            return {"input": text}
        return {"input": moderation_input(str(text or ""), images=record.get("images") or ())}
    if template is not None:
        return render_template(template, record, index, custom_id)
    for key in (INPUT_FIELD[endpoint], "messages", "prompt", "input", "text"):
        if key in record:
            return record[key]
    raise ValueError(
        f"cannot build a {endpoint} request from record keys {sorted(record)}: "
        "give a prompt_template, a builder, or a 'prompt'/'messages'/'input' field"
    )


def build_requests(
    records: Iterable[Mapping[str, Any]],
    *,
    model: str,
    endpoint: str = CHAT,
    builder: Builder | None = None,
    prompt_template: str | None = None,
    system: str | None = None,
    id_field: str | None = None,
    id_prefix: str = "request-",
    response_format: Any = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Turn records into request lines, lazily.

    Each record becomes a body by, in order: ``builder(record)`` (returning a body dict, a list of messages or
    inputs, or a text), ``prompt_template.format_map(record)``, or the record's own
    ``messages``/``prompt``/``input`` field. ``model``, ``system``, ``response_format``, ``tools`` and
    ``params`` fill what the body does not set itself.

    :param records: the records (dicts), e.g. rows of a seed list or an upstream task's XCom.
    :param model: the model for every request (on Azure, the deployment name).
    :param endpoint: one of :data:`ENDPOINTS`, or (vLLM) :data:`SCORE` / :data:`RERANK`, whose records carry
        their body's fields (``query`` and ``documents``; ``text_1`` and ``text_2``...) unless a builder is given.
        :data:`MODERATIONS` classifies the template's text (or the record's ``input``/``text`` field), with the
        record's ``images`` (URLs) as image parts (:func:`moderation_input`).
    :param builder: a callable building one request body from one record.
    :param prompt_template: a ``str.format`` template over the record's fields (the user message).
    :param system: a system message (chat) or ``instructions`` (responses) added to every request.
    :param id_field: the record field holding a unique id; default: ``id_prefix`` + the record's index.
    :param id_prefix: prefix of index-based custom_ids.
    :param response_format: a pydantic model class or JSON schema for structured output (chat).
    :param tools: function tools for every chat request.
    :param params: other body fields for every request (``temperature``, ``max_completion_tokens``...).
    """
    known = tuple(dict.fromkeys((*ENDPOINTS, *VLLM_ENDPOINTS)))
    canonical = canonical_url(endpoint, known)  # any spelling: /chat/completions, /rerank, /v2/rerank...
    if canonical is None:
        raise ValueError(f"unsupported endpoint {endpoint!r}; expected one of {', '.join(known)}")
    endpoint = canonical
    if endpoint == MODERATIONS and (system is not None or response_format is not None or tools):
        raise ValueError(f"{endpoint} classifies its input: system, response_format and tools do not apply")
    shared: dict[str, Any] = dict(params or {})
    if response_format is not None:
        shared["response_format"] = response_format_for(response_format)
    if tools:
        shared["tools"] = [dict(t) for t in tools]
    if prompt_template is not None and builder is None:
        check_template(prompt_template)
    for index, record in enumerate(records):
        custom_id = custom_id_for(record, index, id_field=id_field, prefix=id_prefix)
        value = (builder(record) if builder is not None
                 else _default_value(record, endpoint, prompt_template, index, custom_id))
        body = _body_from(value, endpoint, model, system)
        for key, val in shared.items():
            body.setdefault(key, val)
        yield make_request(custom_id, endpoint, body)


@dataclass(frozen=True)
class RequestTemplate:
    """How to turn records into requests (see :func:`airflow_provider_synth.batch.requests.build_requests`).

    :param prompt_template: a ``str.format`` template over each record's fields (the user message).
    :param system: a system message (chat) or ``instructions`` (responses) for every request.
    :param builder: a callable building a body, a list of messages/inputs, or a text from one record.
    :param id_field: the record field holding a unique id; default: ``request-<index>``.
    :param params: body fields for every request (``temperature``, ``max_completion_tokens``...).
    :param response_format: a pydantic model class or JSON schema for structured output.
    :param tools: function tools for every chat request.
    """

    prompt_template: str | None = None
    system: str | None = None
    builder: Callable[[Mapping[str, Any]], Any] | None = None
    id_field: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    response_format: Any = None
    tools: Sequence[Mapping[str, Any]] | None = None

    def build(self, records: Iterable[Mapping[str, Any]], *, model: str, endpoint: str = CHAT
              ) -> Iterator[dict[str, Any]]:
        """Request lines from ``records`` (:func:`build_requests` with this template's fields)."""
        return build_requests(records, model=model, endpoint=endpoint, builder=self.builder,
                              prompt_template=self.prompt_template, system=self.system, id_field=self.id_field,
                              params=self.params, response_format=self.response_format, tools=self.tools)



def write_requests(requests: Iterable[Mapping[str, Any]], fp: IO[bytes]) -> int:
    """Write request lines as JSONL; return how many were written."""
    return write_jsonl(fp, requests)
