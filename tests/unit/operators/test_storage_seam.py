"""The storage seam, where paid answers become files: object storage through Airflow connections (moto's S3
server on 127.0.0.1), atomic and verified downloads, corrupt service output, full disks, clocks, credentials.

Every test drives the real operator through the real openai SDK over HTTP against the local Batch API server.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator, RequestTemplate

SECRET = "sk-storage-secret-5678"


class FakeTI(SimpleNamespace):
    def xcom_push(self, key, value):
        self.pushed[key] = value


def context(try_number: int = 1, map_index: int = -1) -> dict:
    return {"ti": FakeTI(dag_id="d", task_id="t", run_id="manual__1", map_index=map_index, try_number=try_number,
                         pushed={})}


@pytest.fixture
def server(batch_server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "synth_openai", "password": SECRET, "host": batch_server.base_url}))
    return batch_server


def make_op(output_path, n: int = 10, **kw) -> OpenAIBatchOperator:
    records = [{"id": f"r{i}", "topic": f"t{i}"} for i in range(n)]
    kw.setdefault("deferrable", False)
    return OpenAIBatchOperator(task_id="t", requests=records, model="gpt-4o-mini", output_path=output_path,
                               template=RequestTemplate(prompt_template="About {topic}", id_field="id"),
                               poll_interval=0.05, limits=ShardLimits(max_requests=kw.pop("per_shard", 4)), **kw)


def _lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


# -- object storage through Airflow connections ------------------------------------------------------------------


@pytest.mark.parametrize("conn", [False, True], ids=["s3://bucket (aws_default)", "s3://aws_default@bucket"])
def test_openai_run_writes_every_file_to_s3_through_the_connection(server, s3_bucket, conn) -> None:
    """README's form and ObjectStoragePath's form both work, with the credentials only in the connection."""
    manifest = make_op(s3_bucket.url("synth/run1", conn=conn)).execute(context())
    assert (manifest["total"], manifest["succeeded"], manifest["failed"]) == (10, 10, 0)
    keys = s3_bucket.keys("synth/run1/")
    for name in ("results.jsonl", "failures.jsonl", "manifest.json", "_work/plan.json", "_work/batches.json"):
        assert f"synth/run1/{name}" in keys, keys
    assert any(k.startswith("synth/run1/_claims/") for k in keys)
    assert any(k.startswith("synth/run1/_work/outputs/") for k in keys)
    results = _lines(s3_bucket.read("synth/run1/results.jsonl"))
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(10)]
    plan = json.loads(s3_bucket.read("synth/run1/_work/plan.json"))
    # every stored path names its connection: another worker reopens it through the same one
    assert plan["work_dir"] == f"s3://aws_default@{s3_bucket.bucket}/synth/run1/_work"
    assert manifest["results_path"].startswith(f"s3://aws_default@{s3_bucket.bucket}/")
    assert server.counters["files_created"] == 3 and server.counters["batches_created"] == 3
