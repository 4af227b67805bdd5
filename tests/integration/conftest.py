from __future__ import annotations

import json

import pytest


@pytest.fixture
def openai_conn(batch_server, monkeypatch):
    """The default OpenAI connection, pointed at the local Batch API server (which it returns)."""
    conn = json.dumps({"conn_type": "synth_openai", "password": "sk-test-secret-key-0000",
                       "host": batch_server.base_url})
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", conn)
    return batch_server
