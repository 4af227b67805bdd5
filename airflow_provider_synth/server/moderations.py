"""Deterministic stand-in answers for ``/v1/moderations``, shaped like OpenAI's moderation objects.

The flag rule, which tests steer through the text they send (or the answers they make an upstream step give):

* a marker ``[flag:<category>]`` in a text (or an image URL) flags that category, score 0.99;
* a word of :data:`TERMS` flags its category, score 0.9;
* every other category scores below 0.05, from the text's hash (the same text always scores the same).

The same input always gets the same answer, so a test can assert which rows a filter keeps.
"""

from __future__ import annotations

import re
from typing import Any

from airflow_provider_synth.server.answers import digest

#: OpenAI's omni-moderation categories.
CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)
#: Words that flag a category (whole words, any case).
TERMS: dict[str, tuple[str, ...]] = {
    "violence": ("kill", "murder", "bomb", "shoot", "stab"),
    "harassment": ("idiot", "moron", "loser"),
    "illicit": ("counterfeit", "launder", "smuggle"),
    "self-harm": ("suicide",),
}
_MARKER = re.compile(r"\[flag:([a-z/-]+)\]")
_WORD = {cat: re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE) for cat, words in TERMS.items()}


def _scores(texts: list[str], images: list[str]) -> dict[str, float]:
    seed = digest(texts, images)
    scores = {cat: round(seed[i] / 255 * 0.049, 6) for i, cat in enumerate(CATEGORIES)}
    for text in [*texts, *images]:
        for cat, pattern in _WORD.items():
            if pattern.search(text):
                scores[cat] = max(scores[cat], 0.9)
        for cat in _MARKER.findall(text):
            if cat in scores:
                scores[cat] = 0.99
    return scores


def _result(texts: list[str], images: list[str]) -> dict[str, Any]:
    scores = _scores(texts, images)
    applied = ["text", "image"] if images and texts else ["image"] if images else ["text"]
    return {
        "flagged": any(s >= 0.5 for s in scores.values()),
        "categories": {cat: s >= 0.5 for cat, s in scores.items()},
        "category_scores": scores,
        "category_applied_input_types": {cat: applied for cat in CATEGORIES},
    }


def moderation(body: dict[str, Any], custom_id: str) -> dict[str, Any]:
    """A moderation object for a ``/v1/moderations`` request: one result per text of a list input, one for a
    text or a list of text and image parts."""
    value = body.get("input", "")
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        texts = [str(p.get("text") or "") for p in value if p.get("type") == "text"]
        images = [str((p.get("image_url") or {}).get("url") or "") for p in value if p.get("type") == "image_url"]
        results = [_result(texts, images)]
    elif isinstance(value, list):
        results = [_result([str(v)], []) for v in value]
    else:
        results = [_result([str(value)], [])]
    return {"id": "modr-" + digest(custom_id, value).hex()[:24], "model": str(body.get("model") or
            "omni-moderation-latest"), "results": results}
