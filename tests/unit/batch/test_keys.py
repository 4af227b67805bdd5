"""Run keys are pinned: a task retried after an upgrade must find the batches and tables of its earlier try
(the values are those 0.1.0 computed)."""

from __future__ import annotations

from airflow_provider_synth.runs.cortex_sql import run_key as cortex_run_key
from airflow_provider_synth.runs.openai import idempotency_key


def test_the_openai_run_key_is_stable() -> None:
    key = idempotency_key("dag", "task", "manual__1", -1, "f" * 64, "/v1/chat/completions")
    assert key == "c2b1f3cd610993ea39e04b5e7eb0dfa2"


def test_the_cortex_run_key_is_stable() -> None:
    assert cortex_run_key("dag", "task", "manual__1", -1, "f" * 64, "mistral-large2") == "157BD59C6A1CF2A2"
