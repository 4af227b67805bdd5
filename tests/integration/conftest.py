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


@pytest.fixture
def bedrock(s3_bucket, monkeypatch):
    """The local Bedrock batch stand-in (airflow_provider_synth.server.bedrock) over moto's S3 server, and the
    ``aws_default`` connection pointed at both: S3 at moto (``endpoint_url``), Bedrock at the stand-in
    (``service_config.bedrock.endpoint_url``), as users point one connection at LocalStack-like endpoints.
    Returns the stand-in, with ``bucket`` (the test's S3 bucket) set on it."""
    from airflow_provider_synth.server.bedrock import BedrockStandIn

    srv = BedrockStandIn(s3_bucket.endpoint_url, step_s=0.05, min_records=100).start()
    name, value = s3_bucket.connection_env("aws_default")
    conn = json.loads(value)
    conn["extra"]["service_config"] = {"bedrock": {"endpoint_url": srv.endpoint_url}}
    monkeypatch.setenv(name, json.dumps(conn))
    srv.bucket = s3_bucket
    yield srv
    srv.close()
