"""Every batch operator and decorator claims its output folder before writing into it (OutputClaimMixin).

One layer: ``execute`` with hand-made contexts. Mapped DAGs under real ``dag.test()``: tests/integration
(test_openai_dags.py, test_vllm_dags.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from airflow.providers.common.compat.sdk import AirflowFailException
from airflow.sdk import DAG, task
from fakes.cortex import FakeCortex

from airflow_provider_synth.exceptions import OutputFolderClaimedError
from airflow_provider_synth.operators.cortex import CortexBatchOperator
from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator
from airflow_provider_synth.operators.vllm import VLLMBatchOperator
from airflow_provider_synth.testing.vllm import write_fake_python


def ctx(map_index: int = -1, task_id: str = "t", run_id: str = "r", try_number: int = 1) -> dict[str, Any]:
    return {"ti": SimpleNamespace(dag_id="d", task_id=task_id, run_id=run_id, map_index=map_index,
                                  try_number=try_number, hostname="worker-7")}


def chat(cid: str, model: str = "tiny") -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"say {cid}"}], "max_tokens": 4}}


def write_requests(path: Path, ids: list[str], model: str = "tiny") -> str:
    path.write_bytes(b"".join(orjson.dumps(chat(i, model)) + b"\n" for i in ids))
    return str(path)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the claims, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "_claims" not in p.parts}


@pytest.fixture
def vllm_python(tmp_path: Path) -> str:
    return write_fake_python(tmp_path / "vllm-python")


def vllm_op(tmp_path: Path, python: str, ids: list[str]) -> VLLMBatchOperator:
    return VLLMBatchOperator(task_id="t", input_path=write_requests(tmp_path / f"in-{ids[0]}.jsonl", ids),
                             output_path=str(tmp_path / "out"), model="tiny", python=python)


def test_vllm_second_map_index_on_one_folder_fails_before_the_engine_runs(tmp_path: Path, vllm_python: str) -> None:
    first = vllm_op(tmp_path, vllm_python, ["a0", "a1"]).execute(ctx(map_index=0))
    assert first["succeeded"] == 2
    before = snapshot(tmp_path / "out")
    with pytest.raises(OutputFolderClaimedError) as err:
        vllm_op(tmp_path, vllm_python, ["b0", "b1", "b2"]).execute(ctx(map_index=1))
    assert isinstance(err.value, AirflowFailException)  # a retry would meet the same claim: no retries
    message = str(err.value)
    assert "task_id=t map_index=0 (try 1, on worker-7" in message and "(task_id=t map_index=1)" in message
    assert "{{ ti.map_index }}" in message
    assert snapshot(tmp_path / "out") == before  # map index 0's results, manifest and engine state untouched
    assert [json.loads(x)["custom_id"] for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()] == \
        ["a0", "a1"]


def test_a_retry_another_run_and_a_context_without_ti_pass(tmp_path: Path, vllm_python: str) -> None:
    op = vllm_op(tmp_path, vllm_python, ["a0"])
    assert op.execute(ctx(map_index=0))["succeeded"] == 1
    assert op.execute(ctx(map_index=0, try_number=2))["try_number"] == 2  # a retry of the same task instance
    assert vllm_op(tmp_path, vllm_python, ["b0"]).execute(ctx(map_index=1, run_id="r2"))["succeeded"] == 1
    assert vllm_op(tmp_path, vllm_python, ["c0"]).output_folder() == str(tmp_path / "out")
    no_ti = VLLMBatchOperator(task_id="t", input_path=write_requests(tmp_path / "x.jsonl", ["x0"]),
                              output_path=str(tmp_path / "bare"), model="tiny", python=vllm_python)
    no_ti.claim_output({})
    assert not (tmp_path / "bare").exists()


def test_the_same_operator_object_claims_for_each_task_instance(tmp_path: Path, vllm_python: str) -> None:
    op = vllm_op(tmp_path, vllm_python, ["a0"])
    op.claim_output(ctx(map_index=0))
    op.claim_output(ctx(map_index=0))  # the decorator claimed, then the operator's execute: one claim
    with pytest.raises(OutputFolderClaimedError):
        op.claim_output(ctx(map_index=1))


def test_vllm_decorator_claims_before_calling_the_function_or_writing_requests(tmp_path: Path,
                                                                              vllm_python: str) -> None:
    called: list[int] = []

    def make() -> list[dict[str, Any]]:
        called.append(1)
        return [chat("d0")]

    with DAG("d", schedule=None):
        op = task.synth_vllm_batch(model="tiny", output_path=str(tmp_path / "out"), python=vllm_python)(make)().operator
    vllm_op(tmp_path, vllm_python, ["a0"]).claim_output(ctx(task_id="other"))
    with pytest.raises(OutputFolderClaimedError, match="task_id=other map_index=-1"):
        op.execute(ctx())
    assert called == [] and not (tmp_path / "out" / "_work").exists()


@pytest.fixture
def openai_server(batch_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "synth_openai", "password": "sk-unit", "host": batch_server.base_url}))
    return batch_server


def test_openai_conflict_uploads_nothing(openai_server: Any, tmp_path: Path) -> None:
    def op() -> OpenAIBatchOperator:
        return OpenAIBatchOperator(task_id="t", requests=[{"id": "q", "prompt": "hi"}], model="gpt-4o-mini",
                                   output_path=str(tmp_path / "out"), poll_interval=0.1)

    op().claim_output(ctx(map_index=0))
    with pytest.raises(OutputFolderClaimedError):
        op().execute(ctx(map_index=1))
    assert openai_server.counters["files_created"] == 0 and openai_server.counters["batches_created"] == 0
    assert not (tmp_path / "out" / "_work").exists()


def test_cortex_conflict_runs_nothing_in_snowflake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SNOWFLAKE_DEFAULT", json.dumps(
        {"conn_type": "snowflake", "login": "u", "password": "pw", "schema": "PUBLIC",
         "extra": {"account": "acct", "database": "SYNTH_DB", "warehouse": "WH"}}))
    path = write_requests(tmp_path / "in.jsonl", ["c0", "c1"], model="llama3.1-8b")
    with FakeCortex() as fake:
        first = CortexBatchOperator(task_id="t", input_path=path, output_path=str(tmp_path / "out"), poll_interval=0.05)
        assert first.execute(ctx(map_index=0))["succeeded"] == 2
        calls = list(fake.calls)
        second = CortexBatchOperator(task_id="t", input_path=path, output_path=str(tmp_path / "out"))
        with pytest.raises(OutputFolderClaimedError):
            second.execute(ctx(map_index=1))
        assert fake.calls == calls
