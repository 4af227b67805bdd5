"""The clean-up of old provider files, through the real SDK against the local Batch API server."""

from __future__ import annotations

import io
import json

import pytest
from airflow.sdk import Connection

from airflow_provider_synth.exceptions import SynthError
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.operators.cleanup import OpenAIBatchCleanupOperator
from airflow_provider_synth.runs.cleanup import MAX_LISTED_IDS, clean_up_batch_files, is_our_upload
from airflow_provider_synth.runs.openai import CREATED_BY, CREATED_BY_META, KEY_META

API_KEY = "sk-cleanup-SECRET-24681357"
KEY = "0123456789abcdef0123456789abcdef"
DAY = 86400
CHAT = "/v1/chat/completions"


def requests_bytes(prefix: str, n: int = 3) -> bytes:
    lines = [json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": CHAT,
                         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}]}})
             for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def server(batch_server_factory):
    return batch_server_factory(api_key=API_KEY)


@pytest.fixture
def hook(monkeypatch, server) -> OpenAIBatchHook:
    conn = Connection(conn_id="cleanup", conn_type="synth_openai", password=API_KEY, host=server.base_url,
                      extra=json.dumps({"max_retries": 0, "timeout": 10}))
    monkeypatch.setenv("AIRFLOW_CONN_CLEANUP", conn.as_json())
    return OpenAIBatchHook("cleanup")


def upload(hook: OpenAIBatchHook, name: str, purpose: str = "batch"):
    return hook.client.files.create(file=(name, io.BytesIO(requests_bytes(name)), "application/jsonl"),
                                    purpose=purpose)  # type: ignore[arg-type]


def run_batch(hook: OpenAIBatchHook, server, name: str, *, ours: bool):
    """Upload ``name`` and run a batch over it to completion; returns (input, batch)."""
    file = upload(hook, name)
    metadata = {KEY_META: KEY, CREATED_BY_META: CREATED_BY} if ours else {"team": "search"}
    batch = hook.create_batch(file.id, CHAT, metadata=metadata)
    server.wait_idle()
    return file, hook.get_batch(batch.id)


@pytest.fixture
def account(hook, server):
    """An account holding our old files, our recent files, a running batch of ours, and other teams' files."""
    ours_input, ours_batch = run_batch(hook, server, f"synth-{KEY}-s00000-r0.jsonl", ours=True)
    foreign_input, foreign_batch = run_batch(hook, server, "nightly-eval.jsonl", ours=False)
    lookalike = upload(hook, "synth-notes.jsonl")                          # our prefix, not our shape
    other_purpose = upload(hook, f"synth-{KEY}-s00001-r0.jsonl", "user_data")  # our shape, not a batch input
    crashed_upload = upload(hook, f"synth-{KEY}-s00002-r0.jsonl")          # a try died before creating its batch
    old = [ours_input.id, ours_batch.id, ours_batch.output_file_id, foreign_input.id, foreign_batch.id,
           foreign_batch.output_file_id, lookalike.id, other_purpose.id, crashed_upload.id]
    server.age(old, 10 * DAY)
    recent = upload(hook, f"synth-{KEY}-s00003-r0.jsonl")
    server.configure(in_progress_s=60)
    running_input = upload(hook, f"synth-{KEY}-s00004-r0.jsonl")
    running = hook.create_batch(running_input.id, CHAT, metadata={KEY_META: KEY, CREATED_BY_META: CREATED_BY})
    server.age([running_input.id, running.id], 10 * DAY)
    return {
        "deleted": {ours_input.id, ours_batch.output_file_id, crashed_upload.id},
        "kept": {foreign_input.id, foreign_batch.output_file_id, lookalike.id, other_purpose.id, recent.id,
                 running_input.id},
        "bytes": ours_input.bytes + crashed_upload.bytes + hook.client.files.retrieve(ours_batch.output_file_id).bytes,
    }


def file_ids(hook: OpenAIBatchHook) -> set[str]:
    return {f.id for f in hook.list_files()}


def test_deletes_only_our_old_files(hook, server, account) -> None:
    before = file_ids(hook)
    summary = clean_up_batch_files(hook, 7)
    after = file_ids(hook)
    assert before - after == account["deleted"]
    assert account["kept"] <= after
    assert (summary.deleted, summary.uploads, summary.outputs) == (3, 2, 1)
    assert set(summary.file_ids) == account["deleted"] and summary.bytes == account["bytes"]
    assert (summary.kept_recent, summary.kept_running, summary.errors) == (1, 1, [])
    assert server.counters["files_deleted"] == 3
    # the running batch still runs, and a second clean-up finds nothing more to delete
    assert server.batch(hook.list_batches().__next__().id)["status"] in ("validating", "in_progress")
    again = clean_up_batch_files(hook, 7)
    assert again.deleted == 0 and server.counters["files_deleted"] == 3


def test_dry_run_deletes_nothing_and_reports_the_same(hook, server, account) -> None:
    before = file_ids(hook)
    summary = clean_up_batch_files(hook, 7, dry_run=True)
    assert file_ids(hook) == before and server.counters["files_deleted"] == 0
    assert summary.dry_run and summary.deleted == 3 and set(summary.file_ids) == account["deleted"]
    assert summary.as_dict()["bytes"] == account["bytes"]


def test_age_limit_is_respected(hook, server, account) -> None:
    summary = clean_up_batch_files(hook, 30)   # everything was aged 10 days: too young
    assert summary.deleted == 0 and summary.kept_recent == 4 and server.counters["files_deleted"] == 0


def test_operator_returns_a_json_summary(hook, server, account) -> None:
    op = OpenAIBatchCleanupOperator(task_id="cleanup", conn_id="cleanup", older_than_days=7)
    result = op.execute({})  # type: ignore[arg-type]
    json.dumps(result)
    assert result["deleted"] == 3 and set(result["file_ids"]) == account["deleted"]
    assert result["dry_run"] is False and result["older_than_days"] == 7.0 and not result["file_ids_truncated"]
    assert API_KEY not in json.dumps(result)


def test_operator_fails_after_deleting_what_it_could(hook, server, account) -> None:
    server.add_fault("DELETE /v1/files/*", status=500, times=1)
    op = OpenAIBatchCleanupOperator(task_id="cleanup", conn_id="cleanup", older_than_days=7)
    with pytest.raises(SynthError, match=r"could not delete 1 file\(s\) .*2 other\(s\) were deleted") as err:
        op.execute({})  # type: ignore[arg-type]
    assert API_KEY not in str(err.value)
    assert server.counters["files_deleted"] == 2


def test_a_file_deleted_meanwhile_is_not_an_error(hook, server, account) -> None:
    server.add_fault("DELETE /v1/files/*", status=404, times=1)
    summary = clean_up_batch_files(hook, 7)
    assert summary.errors == [] and summary.deleted == 2


@pytest.mark.parametrize("bad", [-1, "7", True, None])
def test_operator_rejects_bad_age(bad) -> None:
    with pytest.raises(ValueError, match="older_than_days"):
        OpenAIBatchCleanupOperator(task_id="c", older_than_days=bad)


def test_upload_name_shape() -> None:
    from openai.types import FileObject

    def file(name: str, purpose: str = "batch") -> FileObject:
        return FileObject(id="f", bytes=1, created_at=0, filename=name, object="file", purpose=purpose,
                          status="processed")

    assert is_our_upload(file(f"synth-{KEY}-s00000-r0.jsonl"))
    assert is_our_upload(file(f"synth-{KEY}-s123456-r12.jsonl"))
    for name in ["synth-notes.jsonl", f"synth-{KEY}-s0-r0.jsonl", f"synth-{KEY.upper()}-s00000-r0.jsonl",
                 f"xsynth-{KEY}-s00000-r0.jsonl", f"synth-{KEY}-s00000-r0.jsonl.bak", "batch.jsonl"]:
        assert not is_our_upload(file(name)), name
    assert not is_our_upload(file(f"synth-{KEY}-s00000-r0.jsonl", "batch_output"))
    assert MAX_LISTED_IDS >= 100


def test_operator_dry_run_deletes_nothing(hook, server, account) -> None:
    op = OpenAIBatchCleanupOperator(task_id="cleanup", conn_id="cleanup", older_than_days=7, dry_run=True)
    result = op.execute({})  # type: ignore[arg-type]
    assert result["dry_run"] is True and result["deleted"] == 3
    assert server.counters["files_deleted"] == 0 and account["deleted"] <= file_ids(hook)
