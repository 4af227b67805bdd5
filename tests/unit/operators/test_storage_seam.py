"""The storage seam, where paid answers become files: object storage through Airflow connections (moto's S3
server on 127.0.0.1), atomic and verified downloads, corrupt service output, full disks, clocks, credentials.

Every test drives the real operator through the real openai SDK over HTTP against the local Batch API server.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.operators.openai_batch import (
    OpenAIBatchConfig,
    OpenAIBatchOperator,
    RequestTemplate,
)

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


def make_op(output_path, n: int = 10, per_shard: int = 4, retry_failed_requests: int = 2,
            **kw) -> OpenAIBatchOperator:
    records = [{"id": f"r{i}", "topic": f"t{i}"} for i in range(n)]
    kw.setdefault("deferrable", False)
    config = OpenAIBatchConfig(limits=ShardLimits(max_requests=per_shard))
    return OpenAIBatchOperator(task_id="t", requests=records, model="gpt-4o-mini", output_path=output_path,
                               template=RequestTemplate(prompt_template="About {topic}", id_field="id"),
                               retry_failed_requests=retry_failed_requests, poll_interval=0.05, config=config, **kw)


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


# -- downloads: atomic and verified --------------------------------------------------------------------------------


def test_a_download_cut_mid_stream_is_fetched_again_and_never_kept_half(server, tmp_path) -> None:
    """The server sends the full Content-Length, half the bytes, then hangs up (twice): nothing half-written is
    kept under the file's name, and the third attempt lands the whole file."""
    server.add_fault("GET /v1/files/*/content", "truncate", times=2)
    manifest = make_op(tmp_path / "out", n=8, per_shard=8).execute(context())
    assert (manifest["succeeded"], manifest["failed"]) == (8, 0)
    outputs = tmp_path / "out" / "_work" / "outputs"
    assert [p.name for p in outputs.iterdir()] == ["shard-00000-r0-output.jsonl"]
    assert server.counters["faults_injected"] == 2 and server.counters["batches_created"] == 1


WORKER = """
import json, sys
from types import SimpleNamespace
from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.operators.openai_batch import OpenAIBatchConfig, OpenAIBatchOperator, RequestTemplate

class TI(SimpleNamespace):
    def xcom_push(self, key, value):
        pass

n, out = int(sys.argv[1]), sys.argv[2]
op = OpenAIBatchOperator(task_id="t", requests=[{"id": f"r{i}", "topic": f"t{i}"} for i in range(n)],
                         model="gpt-4o-mini", output_path=out, deferrable=False, poll_interval=0.05,
                         template=RequestTemplate(prompt_template="About {topic}", id_field="id"),
                         limits=ShardLimits(max_requests=n))
op.execute({"ti": TI(dag_id="d", task_id="t", run_id="manual__1", map_index=-1, try_number=1)})
"""


def test_worker_killed_mid_download_then_retried_lands_every_paid_answer(server, tmp_path) -> None:
    """SIGKILL of the worker process while it downloads an output file (1.2 MB of it on disk), then a retry:
    the retry downloads the file again and every answer lands, with one upload and one batch. (Before, the
    retry reused the half file and failed on its cut-off line, on every later try too.)"""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    n, out = 3000, tmp_path / "out"
    server.add_fault("GET /v1/files/*/content", "truncate", after_bytes=1_200_000, delay_s=120, times=1)
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(n), str(out)], env=env, cwd=repo,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    outputs = out / "_work" / "outputs"
    try:
        deadline = time.monotonic() + 240
        while not (outputs.is_dir() and any(p.stat().st_size >= 1_000_000 for p in outputs.iterdir())):
            assert worker.poll() is None, "the worker ended before the download started"
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.1)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert server.counters["batches_created"] == 1
    manifest = make_op(out, n=n, per_shard=n).execute(context(try_number=2))
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (n, n, 0, 0)
    assert server.counters["files_created"] == 1 and server.counters["batches_created"] == 1
    assert [p.name for p in outputs.iterdir()] == ["shard-00000-r0-output.jsonl"]  # the killed try's partial is gone
    assert len((out / "results.jsonl").read_bytes().splitlines()) == n


# -- corrupt service output ------------------------------------------------------------------------------------------


def test_corrupt_service_output_lands_the_readable_answers_and_retries_the_rest(server, tmp_path, caplog) -> None:
    """An output file holding an HTML 502 page and a cut-off line where two answers should be: the other answers
    land, both lines are counted (file, line) in the manifest, and the retry round asks for those two ids again
    (and only them), so every request ends in results."""
    from airflow_provider_synth.server.server import Outcome

    server.set_outcome("r3", Outcome.unreadable(), times=1)
    server.set_outcome("r7", Outcome.cut_off(), times=1)
    manifest = make_op(tmp_path / "out", n=10, per_shard=10, retry_failed_requests=1).execute(context())
    assert (manifest["succeeded"], manifest["failed"], manifest["missing"]) == (10, 0, 0)
    assert manifest["unreadable"] == 2
    lines = manifest["unreadable_lines"]
    assert {(b["file"].rsplit("/", 1)[-1], b["custom_id"]) for b in lines} == {
        ("shard-00000-r0-output.jsonl", None), ("shard-00000-r0-output.jsonl", "r7")}
    assert all(b["line"] >= 1 for b in lines)
    assert server.counters["batches_created"] == 2
    retried = (tmp_path / "out" / "_work" / "shards" / "shard-00000-r1.jsonl").read_bytes()
    assert sorted(json.loads(x)["custom_id"] for x in retried.splitlines()) == ["r3", "r7"]
    assert "could not be read" in caplog.text and "output_unreadable" in caplog.text


def test_corrupt_output_without_retry_rounds_ends_as_output_unreadable_failures(server, tmp_path) -> None:
    from airflow_provider_synth.server.server import Outcome

    server.set_outcome("r2", Outcome.unreadable())
    manifest = make_op(tmp_path / "out", n=6, per_shard=6, retry_failed_requests=0,
                       max_failed_ratio=0.5).execute(context())
    assert (manifest["succeeded"], manifest["failed"], manifest["error_codes"]) == (5, 1, {"output_unreadable": 1})
    row = json.loads((tmp_path / "out" / "failures.jsonl").read_bytes())
    assert (row["custom_id"], row["error"]["code"], row["retryable"]) == ("r2", "output_unreadable", True)


# -- disk full, permission denied, a storage outage ---------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs (root only: mount -t tmpfs)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_while_landing_fails_clearly_and_the_retry_pays_nothing_twice(server, small_disk) -> None:
    """ENOSPC on a real tmpfs while the output file lands: a clear error naming the path, no half file under
    its name, no results.jsonl; once space is freed, the next try completes with the same one upload and batch."""
    from airflow.sdk.exceptions import TaskDeferred

    from airflow_provider_synth.batch.errors import StorageError

    out = small_disk / "out"
    with pytest.raises(TaskDeferred):
        make_op(out, n=400, per_shard=400, deferrable=True).execute(context())
    server.wait_idle()
    ballast = small_disk / "ballast"
    free = __import__("shutil").disk_usage(small_disk).free
    ballast.write_bytes(b"\0" * max(free - 8 * 1024, 0))  # room for less than the output file
    with pytest.raises(StorageError) as info:
        make_op(out, n=400, per_shard=400).execute(context(try_number=2))
    message = str(info.value)
    assert "shard-00000-r0-output.jsonl" in message and "No space left on device" in message
    assert "full" in message
    outputs = out / "_work" / "outputs"
    assert not (outputs / "shard-00000-r0-output.jsonl").exists()
    assert not (out / "results.jsonl").exists() and not (out / "manifest.json").exists()
    ballast.unlink()
    manifest = make_op(out, n=400, per_shard=400).execute(context(try_number=3))
    assert (manifest["succeeded"], manifest["failed"]) == (400, 0)
    assert server.counters["files_created"] == 1 and server.counters["batches_created"] == 1
    assert [p.name for p in outputs.iterdir()] == ["shard-00000-r0-output.jsonl"]


def test_permission_denied_names_the_path(server, tmp_path) -> None:
    import os

    from airflow.sdk.exceptions import TaskDeferred

    from airflow_provider_synth.batch.errors import StorageError

    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    out = tmp_path / "out"
    with pytest.raises(TaskDeferred):
        make_op(out, deferrable=True).execute(context())
    server.wait_idle()
    (out / "_work").chmod(0o500)
    try:
        with pytest.raises(StorageError, match="permission denied"):
            make_op(out).execute(context(try_number=2))
    finally:
        (out / "_work").chmod(0o700)
    assert make_op(out).execute(context(try_number=3))["succeeded"] == 10
    assert server.counters["batches_created"] == 3


def test_s3_outage_during_the_merge_fails_clearly_and_the_retry_completes(server, s3_bucket, monkeypatch) -> None:
    """moto's S3 server stops while the merge reads the downloaded outputs: the try fails with an error naming
    the path, nothing is claimed as done (no results.jsonl, no manifest), and once S3 is back the next try
    completes with the same 1 upload and 1 batch."""
    import contextlib

    from airflow_provider_synth.batch.errors import StorageError
    from airflow_provider_synth.runs.openai import BatchRun

    out = s3_bucket.url("lake/run", conn=False)
    merge = BatchRun.merge
    outage = contextlib.ExitStack()

    def merge_in_an_outage(self):
        outage.enter_context(s3_bucket.outage())
        return merge(self)

    monkeypatch.setattr(BatchRun, "merge", merge_in_an_outage)
    with outage, pytest.raises(StorageError) as info:
        make_op(out, n=6, per_shard=6).execute(context())
    assert f"{s3_bucket.bucket}/lake/run/" in str(info.value) and "reachable" in str(info.value)
    keys = s3_bucket.keys("lake/run/")
    assert "lake/run/_work/outputs/shard-00000-r0-output.jsonl" in keys
    assert "lake/run/results.jsonl" not in keys and "lake/run/manifest.json" not in keys
    monkeypatch.setattr(BatchRun, "merge", merge)
    manifest = make_op(out, n=6, per_shard=6).execute(context(try_number=2))
    assert (manifest["succeeded"], manifest["failed"]) == (6, 0)
    assert len(s3_bucket.read("lake/run/results.jsonl").splitlines()) == 6
    assert server.counters["files_created"] == 1 and server.counters["batches_created"] == 1


# -- clocks ------------------------------------------------------------------------------------------------------


def test_a_service_clock_hours_behind_never_cancels_a_fresh_batch(server, tmp_path) -> None:
    """The service reports created_at 2 h before the worker's clock: the deadline is anchored at the worker's
    first submission, so a retry with a 1 h timeout waits for the batch instead of cancelling it at once."""
    from airflow.sdk.exceptions import TaskDeferred

    server.configure(in_progress_s=1.0)
    out = tmp_path / "out"
    with pytest.raises(TaskDeferred) as info:
        make_op(out, deferrable=True, timeout=3600).execute(context())
    ids = info.value.trigger.serialize()[1]["batch_ids"]
    assert server.age(ids, 2 * 3600) == ids  # the service's clock is two hours behind
    manifest = make_op(out, timeout=3600).execute(context(try_number=2))
    assert (manifest["succeeded"], manifest["failed"]) == (10, 0)
    assert server.counters.get("batches_cancelled", 0) == 0 and server.counters["batches_created"] == 3
    plan = json.loads((out / "_work" / "plan.json").read_bytes())
    assert plan["submitted_at"] <= info.value.trigger.serialize()[1]["end_time"] - 3600 + 1


# -- credentials -------------------------------------------------------------------------------------------------


def test_a_wrong_api_key_names_the_connection_and_host_and_fails_without_retries(batch_server_factory, tmp_path,
                                                                               monkeypatch) -> None:
    from airflow.providers.common.compat.sdk import AirflowFailException

    from airflow_provider_synth.exceptions import ConnectionAuthError

    srv = batch_server_factory(api_key="sk-the-right-key-0000")
    wrong = "sk-wrong-key-abcdef123456"
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "synth_openai", "password": wrong, "host": srv.base_url}))
    with pytest.raises(ConnectionAuthError) as info:
        make_op(tmp_path / "out").execute(context())
    message = str(info.value)
    assert isinstance(info.value, AirflowFailException)  # no retry: it would be refused the same way
    assert "'synth_openai_default'" in message and srv.base_url.rstrip("/") in message and "HTTP 401" in message
    assert "API key" in message and wrong not in message and "abcdef" not in message
    assert srv.counters.get("files_created", 0) == 0 and srv.counters.get("batches_created", 0) == 0


def test_a_403_on_batch_creation_says_what_to_check(server, tmp_path) -> None:
    from airflow_provider_synth.exceptions import ConnectionAuthError

    server.add_fault("POST /v1/batches", status=403, times=None)
    with pytest.raises(ConnectionAuthError, match=r"HTTP 403.*not allowed to do this.*permissions") as info:
        make_op(tmp_path / "out").execute(context())
    assert "'synth_openai_default'" in str(info.value) and SECRET not in str(info.value)
