"""The clean-up example DAG under ``dag.test()`` against the local Batch API server."""

from __future__ import annotations

import io
import json

import pytest

KEY = "fedcba9876543210fedcba9876543210"
CHAT = "/v1/chat/completions"


def upload(client, name: str):
    line = json.dumps({"custom_id": name, "method": "POST", "url": CHAT,
                       "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": name}]}})
    return client.files.create(file=(name, io.BytesIO(line.encode() + b"\n"), "application/jsonl"), purpose="batch")


@pytest.mark.integration
@pytest.mark.parametrize("dry_run", [False, True])
def test_cleanup_dag_deletes_our_old_files_only(airflow_db, openai_conn, monkeypatch, dry_run) -> None:
    from openai import OpenAI

    from airflow_provider_synth.testing.dags import dag_bag

    if dry_run:
        monkeypatch.setenv("SYNTH_CLEANUP_DRY_RUN", "1")
    client = OpenAI(base_url=openai_conn.base_url, api_key="sk-test")
    ours = upload(client, f"synth-{KEY}-s00000-r0.jsonl")
    batch = client.batches.create(input_file_id=ours.id, endpoint=CHAT, completion_window="24h",
                                  metadata={"synth_key": KEY, "created_by": "airflow-provider-synth"})
    openai_conn.wait_idle()
    output_id = client.batches.retrieve(batch.id).output_file_id
    foreign = upload(client, "team-eval.jsonl")
    openai_conn.age([ours.id, output_id, foreign.id, batch.id], 8 * 86400)
    recent = upload(client, f"synth-{KEY}-s00001-r0.jsonl")

    bag = dag_bag()
    assert not bag.import_errors, bag.import_errors
    dr = bag.get_dag("example_openai_cleanup").test()
    assert dr.state == "success"
    summary = dr.get_task_instance("delete_old_batch_files").xcom_pull(task_ids="delete_old_batch_files")
    assert summary["dry_run"] is dry_run
    assert (summary["deleted"], summary["uploads"], summary["outputs"]) == (2, 1, 1)
    assert set(summary["file_ids"]) == {ours.id, output_id} and summary["kept_recent"] == 1
    left = {f.id for f in client.files.list()}
    assert {foreign.id, recent.id} <= left
    assert ({ours.id, output_id} <= left) is dry_run
    assert openai_conn.counters["files_deleted"] == (0 if dry_run else 2)
