"""vLLM writing to S3 through an Airflow connection (moto's server on 127.0.0.1): the real runner in a real
subprocess with a fake ``LLM``; the engine's answers are copied to the remote output folder written, then
checked, and a retry after the engine died resumes from them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from airflow_provider_synth.exceptions import VLLMEngineError
from airflow_provider_synth.operators.vllm import VLLMBatchOperator
from airflow_provider_synth.testing.vllm import write_fake_python


def chat(cid: str, text: str) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    return write_fake_python(tmp_path / "vllm-python")


def test_vllm_run_reads_and_writes_s3_and_a_retry_resumes_from_the_saved_answers(s3_bucket, fake_python,
                                                                                 tmp_path) -> None:
    s3_bucket.write("in/requests.jsonl", b"".join(orjson.dumps(chat(f"v{i:02d}", f"hi {i}")) + b"\n"
                                                  for i in range(40)))
    context = {"ti": SimpleNamespace(try_number=1, dag_id="d", task_id="t", run_id="r", map_index=-1)}

    def operator(**kw) -> VLLMBatchOperator:
        return VLLMBatchOperator(task_id="vllm", input_path=s3_bucket.url("in/requests.jsonl"),
                                 output_path=s3_bucket.url("out/run1", conn=False), model="tiny",
                                 python=fake_python, chunk_size=8, work_dir=str(tmp_path),
                                 checkpoint_interval=0.0, **kw)

    with pytest.raises(VLLMEngineError):
        operator(env={"SYNTH_FAKE_VLLM_DIE_AFTER": "16"}).execute(context)
    saved = [orjson.loads(x) for x in s3_bucket.read("out/run1/_vllm/engine-output.jsonl").splitlines()]
    assert len(saved) >= 16  # the answers given before the engine died are in S3, whole lines only
    manifest = operator().execute(context)
    assert (manifest["total"], manifest["succeeded"], manifest["failed"]) == (40, 40, 0)
    results = [orjson.loads(x) for x in s3_bucket.read("out/run1/results.jsonl").splitlines()]
    assert [r["custom_id"] for r in results] == [f"v{i:02d}" for i in range(40)]
    assert manifest["results_path"] == f"s3://aws_default@{s3_bucket.bucket}/out/run1/results.jsonl"
    assert "out/run1/manifest.json" in s3_bucket.keys("out/run1/")
    assert list(tmp_path.glob("synth-vllm-*")) == []
