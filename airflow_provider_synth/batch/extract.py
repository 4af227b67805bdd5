"""Read what came back: assistant text, tool calls, structured output, embeddings, by custom_id.

These work on output lines (dicts) and on files of them, and cover the seeds' helpers
(``extract_messages_from_responses``, ``get_results``, ``get_unsuccessful_requests``,
``get_requests_by_custom_ids``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import msgspec

from airflow_provider_synth.batch.jsonl import iter_jsonl, loads
from airflow_provider_synth.batch.paths import open_path

T = TypeVar("T")

#: The one forced tool that carries an Anthropic answer's structured output where the Messages API version has
#: no ``output_config`` (``2023-06-01``): its input is the answer's text.
STRUCTURED_OUTPUT_TOOL = "synth_response_format"


def anthropic_text(content: Any) -> str | None:
    """The text of an Anthropic message's content blocks: its text blocks joined, or, when it has none, the
    input of the structured-output tool (:data:`STRUCTURED_OUTPUT_TOOL`) as JSON; ``None`` otherwise."""
    blocks = [b for b in content or () if isinstance(b, Mapping)]
    texts = [b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str)]
    if texts:
        return "".join(texts)
    for b in blocks:
        if b.get("type") == "tool_use" and b.get("name") == STRUCTURED_OUTPUT_TOOL:
            from airflow_provider_synth.batch.jsonl import dumps

            return dumps(b.get("input")).decode()
    return None


def iter_output(path: Any) -> Iterator[dict[str, Any]]:
    """Iterate the lines of a results, failures, output or request file as dicts."""
    with open_path(path, "rb") as fp:
        for _, raw in iter_jsonl(fp):
            yield loads(raw)


def _body(line: Mapping[str, Any]) -> Mapping[str, Any]:
    response = line.get("response") or {}
    body: Mapping[str, Any] = response.get("body") or {}
    return body


def extract_text(line: Mapping[str, Any]) -> str | None:
    """The answer's text: chat ``message.content``, completions ``text``, responses ``output_text``, or an
    Anthropic message's text blocks (see :func:`anthropic_text`). ``None`` for a null content (e.g. a
    tool-call-only answer) or a failed line."""
    body = _body(line)
    if body.get("type") == "message" and "content" in body:
        return anthropic_text(body.get("content"))
    choices = body.get("choices")
    if choices:
        first = choices[0]
        if "message" in first:
            content = first["message"].get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, Mapping)) or None
            return content if isinstance(content, str) else None
        text = first.get("text")
        return text if isinstance(text, str) else None
    if "output" in body:
        texts = [part.get("text", "") for item in body.get("output") or () if item.get("type") == "message"
                 for part in item.get("content") or () if part.get("type") == "output_text"]
        return "".join(texts) if texts else None
    return None


def extract_tool_calls(line: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Tool calls of the answer (parallel calls included) as ``{"id", "name", "arguments"}``, with the
    arguments parsed from JSON (left as the raw string if the model produced invalid JSON)."""
    body = _body(line)
    calls: list[dict[str, Any]] = []
    raw_calls: list[tuple[str | None, str | None, Any]] = []
    for choice in (body.get("choices") or ())[:1]:
        for call in (choice.get("message") or {}).get("tool_calls") or ():
            fn = call.get("function") or {}
            raw_calls.append((call.get("id"), fn.get("name"), fn.get("arguments")))
    if body.get("type") == "message":  # Anthropic: tool_use blocks, their input already parsed
        for block in body.get("content") or ():
            if block.get("type") == "tool_use" and block.get("name") != STRUCTURED_OUTPUT_TOOL:
                raw_calls.append((block.get("id"), block.get("name"), block.get("input")))
    for item in body.get("output") or ():
        if item.get("type") == "function_call":
            raw_calls.append((item.get("call_id") or item.get("id"), item.get("name"), item.get("arguments")))
    for call_id, name, arguments in raw_calls:
        try:
            parsed = loads(arguments) if isinstance(arguments, str) else arguments
        except (ValueError, msgspec.DecodeError):
            parsed = arguments
        calls.append({"id": call_id, "name": name, "arguments": parsed})
    return calls


def parse_structured(line: Mapping[str, Any], model: type[T]) -> T | None:
    """Parse the answer's JSON text into ``model`` (a pydantic model class); ``None`` when there is no text.

    :raises pydantic.ValidationError: the text does not fit the model.
    """
    text = extract_text(line)
    if text is None:
        return None
    parsed: T = model.model_validate_json(text)  # type: ignore[attr-defined]
    return parsed


def extract_embeddings(line: Mapping[str, Any]) -> list[list[float]]:
    """The embedding vectors of one line, in input order (one per input of a list input)."""
    data = sorted(_body(line).get("data") or (), key=lambda d: d.get("index", 0))
    return [d["embedding"] for d in data if "embedding" in d]


def extract_messages_from_responses(lines: Iterable[Mapping[str, Any]]) -> dict[str, str | None]:
    """custom_id -> assistant text, for every line (the seed's helper of the same name)."""
    return {line["custom_id"]: extract_text(line) for line in lines}


def get_results(path: Any, custom_ids: Collection[str] | None = None) -> dict[str, dict[str, Any]]:
    """custom_id -> output line from a results file, optionally only for ``custom_ids``."""
    wanted = set(custom_ids) if custom_ids is not None else None
    return {line["custom_id"]: line for line in iter_output(path)
            if wanted is None or line["custom_id"] in wanted}


def get_requests_by_custom_ids(requests_path: Any, custom_ids: Collection[str]) -> list[dict[str, Any]]:
    """The request lines with these custom_ids, in file order."""
    wanted = set(custom_ids)
    return [req for req in iter_output(requests_path) if req.get("custom_id") in wanted]


def get_unsuccessful_requests(requests_path: Any, failures_path: Any) -> list[dict[str, Any]]:
    """The request lines of every failed or missing request listed in ``failures.jsonl``: fix and resubmit."""
    failed = {row["custom_id"] for row in iter_output(failures_path)}
    return get_requests_by_custom_ids(requests_path, failed)


def extract_parsed(line: Mapping[str, Any], model: type[T] | None = None) -> Any:
    """The structured answer of a results line: the ``"parsed"`` object the output checks wrote (validated
    against the schema), else the answer's text parsed as JSON; as ``model`` (a pydantic model class) when
    given. ``None`` when the line has no text.

    :raises ValueError: the text is not JSON (``pydantic.ValidationError`` when it does not fit ``model``).
    """
    if "parsed" in line:
        value = line["parsed"]
    else:
        text = extract_text(line)
        if text is None:
            return None
        value = loads(text)
    if model is None:
        return value
    return model.model_validate(value)  # type: ignore[attr-defined]


def iter_parsed(path: Any, model: type[T] | None = None) -> Iterator[tuple[str, Any]]:
    """``(custom_id, parsed object)`` for every line of a results file, in its order (input order)."""
    for line in iter_output(path):
        yield line["custom_id"], extract_parsed(line, model)


class Moderation(msgspec.Struct, frozen=True):
    """One request's moderation verdict (``/v1/moderations``), over every input it classified.

    :param custom_id: the request's id.
    :param flagged: whether any input was flagged.
    :param categories: the categories flagged on any input, sorted.
    :param scores: each category's highest score over the inputs.
    """

    custom_id: str
    flagged: bool
    categories: tuple[str, ...]
    scores: dict[str, float]


def extract_moderation(line: Mapping[str, Any]) -> Moderation | None:
    """The moderation verdict of one output line, or ``None`` for a line that is not a moderation answer."""
    results = _body(line).get("results")
    if not isinstance(results, list) or not results:
        return None
    flagged, categories, scores = False, set[str](), dict[str, float]()
    for result in results:
        flagged = flagged or bool(result.get("flagged"))
        categories.update(name for name, on in (result.get("categories") or {}).items() if on)
        for name, score in (result.get("category_scores") or {}).items():
            scores[name] = max(float(score), scores.get(name, 0.0))
    return Moderation(str(line.get("custom_id")), flagged, tuple(sorted(categories)), scores)


def iter_moderations(path: Any) -> Iterator[Moderation]:
    """Each moderation verdict of a results file (a moderation run's ``results.jsonl``), in file order."""
    for line in iter_output(path):
        verdict = extract_moderation(line)
        if verdict is not None:
            yield verdict


def flagged_ids(path: Any, *, threshold: float | None = None) -> set[str]:
    """The custom_ids a moderation run flagged; with ``threshold``, also those with any category score at or
    above it (a stricter filter than the service's own flags).

    :param path: the moderation run's ``results.jsonl``.
    :param threshold: a score (0-1) that flags on its own.
    """
    return {m.custom_id for m in iter_moderations(path)
            if m.flagged or (threshold is not None and any(s >= threshold for s in m.scores.values()))}
