"""OpenAIBatchOperator, one layer at a time: deferral, events, worker-side wait, timeout and kill.

The operator talks to the local Batch API server through the real hook and SDK; the Airflow context is a
small stand-in (these tests call execute/execute_complete directly).
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.exceptions import BatchFailedError, BatchTimeoutError, TriggerEventError
from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator, RequestTemplate
from airflow_provider_synth.triggers.openai_batch import OpenAIBatchTrigger

SECRET = "sk-unit-secret-1234"


class FakeTI(SimpleNamespace):
    def xcom_push(self, key, value):
        self.pushed[key] = value


def context(run_id: str = "manual__1", try_number: int = 1) -> dict:
    ti = FakeTI(dag_id="d", task_id="t", run_id=run_id, map_index=-1, try_number=try_number, pushed={})
    return {"ti": ti}


@pytest.fixture
def server(batch_server, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "synth_openai", "password": SECRET, "host": batch_server.base_url}))
    return batch_server


def make_op(tmp_path, **kw) -> OpenAIBatchOperator:
    records = [{"id": f"r{i}", "topic": f"t{i}"} for i in range(kw.pop("n", 10))]
    kw.setdefault("deferrable", True)
    return OpenAIBatchOperator(task_id="t", requests=records, model="gpt-4o-mini", output_path=str(tmp_path),
                               template=RequestTemplate(prompt_template="About {topic}", id_field="id"),
                               poll_interval=0.1, limits=ShardLimits(max_requests=4), **kw)


def test_init_validates_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one of input_path or requests"):
        OpenAIBatchOperator(task_id="x", output_path="o")
    with pytest.raises(ValueError, match="max_failed_ratio"):
        OpenAIBatchOperator(task_id="x", output_path="o", input_path="i", max_failed_ratio=2)


def test_execute_defers_one_trigger_for_all_batches(server, tmp_path) -> None:
    op = make_op(tmp_path)
    before = time.time()
    with pytest.raises(TaskDeferred) as info:
        op.execute(context())
    trigger = info.value.trigger
    assert isinstance(trigger, OpenAIBatchTrigger) and info.value.method_name == "execute_complete"
    path, kwargs = trigger.serialize()
    assert path == "airflow_provider_synth.triggers.openai_batch.OpenAIBatchTrigger"
    assert kwargs["conn_id"] == "synth_openai_default" and len(kwargs["batch_ids"]) == 3
    assert kwargs["poll_interval"] == 0.1 and before + op.timeout_s - 5 < kwargs["end_time"] < time.time() + op.timeout_s
    assert SECRET not in json.dumps(kwargs)
    assert server.counters["batches_created"] == 3


def test_redeferral_keeps_the_first_deadline(server, tmp_path, monkeypatch) -> None:
    import airflow_provider_synth.operators._base as op_module  # the lifecycle, shared by every backend

    server.configure(in_progress_s=30)
    op = make_op(tmp_path)
    with pytest.raises(TaskDeferred) as first:
        op.execute(context())

    class AnHourLater:  # the retry runs an hour later: a deadline computed from "now" would move
        sleep = staticmethod(time.sleep)

        @staticmethod
        def time() -> float:
            return time.time() + 3600

    monkeypatch.setattr(op_module, "time", AnHourLater)
    with pytest.raises(TaskDeferred) as second:  # a retried try re-attaches: no new batches, same end_time
        make_op(tmp_path).execute(context(try_number=2))
    assert first.value.trigger.serialize()[1]["end_time"] == second.value.trigger.serialize()[1]["end_time"]
    assert server.counters["batches_created"] == 3 and server.counters["files_created"] == 3


@pytest.mark.parametrize("event", [None, {}, {"status": "weird", "batches": {}}, {"status": "success"}])
def test_execute_complete_rejects_bad_events(tmp_path, event) -> None:
    with pytest.raises(TriggerEventError):
        make_op(tmp_path).execute_complete(context(), event)


def test_execute_complete_error_event_fails(server, tmp_path) -> None:
    op = make_op(tmp_path)
    with pytest.raises(TaskDeferred):
        op.execute(context())
    with pytest.raises(BatchFailedError, match="boom"):
        op.execute_complete(context(), {"status": "error", "message": "boom", "batches": {}})


def test_execute_complete_success_merges(server, tmp_path) -> None:
    op = make_op(tmp_path)
    with pytest.raises(TaskDeferred) as info:
        op.execute(context())
    server.wait_idle()
    ids = info.value.trigger.serialize()[1]["batch_ids"]
    states = {b: {"status": "in_progress"} for b in ids}  # stale: the service's own state wins
    manifest = op.execute_complete(context(), {"status": "success", "message": "", "batches": states})
    assert manifest["succeeded"] == 10 and manifest["status"] == "completed"
    assert SECRET not in json.dumps(manifest)


def test_timeout_event_cancels_running_batches(server, tmp_path) -> None:
    server.configure(in_progress_s=30)
    op = make_op(tmp_path)
    with pytest.raises(TaskDeferred) as info:
        op.execute(context())
    ids = info.value.trigger.serialize()[1]["batch_ids"]
    with pytest.raises(BatchTimeoutError, match="cancelled"):
        op.execute_complete(context(), {"status": "timeout", "message": "", "batches": {
            b: {"status": "in_progress"} for b in ids}})
    server.wait_idle()
    assert server.counters["batches_cancelled"] == 3


def test_worker_side_wait_without_deferral(server, tmp_path) -> None:
    manifest = make_op(tmp_path, deferrable=False, n=9).execute(context())
    assert (manifest["total"], manifest["succeeded"], manifest["shards"]) == (9, 9, 3)


def test_worker_side_timeout_cancels(server, tmp_path) -> None:
    server.configure(in_progress_s=30)
    with pytest.raises(BatchTimeoutError):
        make_op(tmp_path, deferrable=False, timeout=0.5).execute(context())
    server.wait_idle()
    assert server.counters["batches_cancelled"] == 3


def test_on_kill_cancels_running_batches(server, tmp_path) -> None:
    server.configure(in_progress_s=30)
    op = make_op(tmp_path, wait_for_completion=False)
    op.execute(context())
    op.on_kill()
    server.wait_idle()
    assert server.counters["batches_cancelled"] == 3


def test_reattach_without_service_metadata_uses_the_recorded_batch_ids(server, tmp_path, monkeypatch) -> None:
    """A service that drops batch metadata (or lags its list) still never gets a second submission."""
    from airflow_provider_synth.hooks.openai import OpenAIBatchHook

    server.configure(in_progress_s=30)
    with pytest.raises(TaskDeferred):
        make_op(tmp_path).execute(context())
    monkeypatch.setattr(OpenAIBatchHook, "find_batches", lambda self, metadata, created_after=None: [])
    with pytest.raises(TaskDeferred) as info:
        make_op(tmp_path).execute(context(try_number=2))
    assert len(info.value.trigger.serialize()[1]["batch_ids"]) == 3
    assert server.counters["batches_created"] == 3


def test_max_active_batches_submits_in_waves(server, tmp_path) -> None:
    op = make_op(tmp_path, max_active_batches=1)
    with pytest.raises(TaskDeferred) as info:
        op.execute(context())
    assert len(info.value.trigger.serialize()[1]["batch_ids"]) == 1
    assert server.counters["batches_created"] == 1 and server.counters["files_created"] == 1
    for wave in (2, 3):
        server.wait_idle()
        ids = info.value.trigger.serialize()[1]["batch_ids"]
        with pytest.raises(TaskDeferred) as info:
            op.execute_complete(context(), {"status": "success", "message": "", "batches": {b: {} for b in ids}})
        assert len(info.value.trigger.serialize()[1]["batch_ids"]) == 1
        assert server.counters["batches_created"] == wave
    server.wait_idle()
    ids = info.value.trigger.serialize()[1]["batch_ids"]
    manifest = op.execute_complete(context(), {"status": "success", "message": "", "batches": {b: {} for b in ids}})
    assert (manifest["succeeded"], manifest["shards"], len(manifest["batch_ids"])) == (10, 3, 3)


def _largest_shard_tokens(n: int, per_shard: int) -> int:
    from airflow_provider_synth.server.answers import input_tokens

    tokens = [input_tokens({"messages": [{"role": "user", "content": f"About t{i}"}]}) for i in range(n)]
    return max(sum(tokens[k:k + per_shard]) for k in range(0, n, per_shard))


def test_batches_refused_for_the_enqueued_token_limit_are_submitted_again(server, tmp_path) -> None:
    """One shard fits the model's enqueued-token limit, two do not: the refused shards go again once the
    running one finished, with no new upload and no retry round spent; every request lands."""
    server.configure(enqueued_token_limit=_largest_shard_tokens(10, 4), in_progress_s=1.0)
    manifest = make_op(tmp_path, deferrable=False, retry_failed_requests=0).execute(context())
    assert (manifest["succeeded"], manifest["failed"], manifest["missing"]) == (10, 0, 0)
    assert server.counters["files_created"] == 3  # resubmissions reuse the shard's upload
    assert server.counters["batches_created"] > 3  # some were refused and went again
    from airflow_provider_synth.hooks.openai import OpenAIBatchHook

    refused = [b for b in OpenAIBatchHook().list_batches() if b.status == "failed"]
    assert refused and all(e.code == "token_limit_exceeded" for b in refused for e in b.errors.data)
    resubmits = json.loads((tmp_path / "_work" / "token_limit_resubmits.json").read_text())
    assert sum(resubmits.values()) == len(refused) == manifest["token_limit_resubmits"]


def test_max_active_batches_keeps_inside_the_enqueued_token_limit(server, tmp_path) -> None:
    server.configure(enqueued_token_limit=_largest_shard_tokens(10, 4), in_progress_s=1.0)
    manifest = make_op(tmp_path, deferrable=False, max_active_batches=1).execute(context())
    assert manifest["succeeded"] == 10
    assert server.counters["batches_created"] == 3  # none refused


def test_token_limit_refusals_past_the_resubmit_budget_end_as_failures(server, tmp_path) -> None:
    server.configure(enqueued_token_limit=_largest_shard_tokens(10, 4), in_progress_s=1.0)
    with pytest.raises(BatchFailedError, match=r"failed .*missing"):
        make_op(tmp_path, deferrable=False, retry_failed_requests=0, token_limit_resubmits=0).execute(context())
    assert server.counters["batches_created"] == 3


def test_invalid_requests_skip_sends_only_the_valid_lines(server, tmp_path) -> None:
    """One bad line in a file: "fail" refuses before any upload; "skip" runs the rest and reports it."""
    from airflow_provider_synth.batch.errors import InvalidRequestsError

    def line(cid: str, **body: object) -> bytes:
        b = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": cid}], **body}
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": b}).encode()

    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([line("a"), line("b", stream=True), b"{torn", line("c"), line("d")]) + b"\n")
    with pytest.raises(InvalidRequestsError, match="2 invalid request"):
        OpenAIBatchOperator(task_id="t", input_path=str(src), output_path=str(tmp_path / "refused"),
                            deferrable=False, poll_interval=0.1).execute(context())
    assert server.counters["files_created"] == 0
    with pytest.raises(ValueError, match="invalid_requests"):
        OpenAIBatchOperator(task_id="t", input_path=str(src), output_path="o", invalid_requests="drop")

    out = tmp_path / "out"
    with pytest.raises(BatchFailedError, match="2 of 5 requests failed"):
        OpenAIBatchOperator(task_id="t", input_path=str(src), output_path=str(out), deferrable=False,
                            poll_interval=0.1, invalid_requests="skip").execute(context())
    assert server.counters["requests_processed"] == 3
    manifest = OpenAIBatchOperator(task_id="t", input_path=str(src), output_path=str(out), deferrable=False,
                                   poll_interval=0.1, invalid_requests="skip", max_failed_ratio=0.4,
                                   ).execute(context(try_number=2))
    assert server.counters["requests_processed"] == 3 and server.counters["batches_created"] == 1  # re-attached
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["invalid"]) == (5, 3, 2, 2)
    assert manifest["synthetic_ids"] == 1
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_bytes().splitlines()]
    assert [(f["custom_id"], f["line"], f["status_code"]) for f in failures] == [("b", 2, 400), ("line-3", 3, 400)]
    results = [json.loads(x)["custom_id"] for x in (out / "results.jsonl").read_bytes().splitlines()]
    assert results == ["a", "c", "d"]


def test_budget_and_rounds_are_arguments_and_the_config_fields_only_deprecated_aliases(tmp_path) -> None:
    import warnings

    from airflow_provider_synth.operators.openai_batch import OpenAIBatchConfig

    def build(**kw) -> OpenAIBatchOperator:
        return OpenAIBatchOperator(task_id="t", requests=[{"id": "a", "topic": "x"}], model="gpt-4o-mini",
                                   output_path=str(tmp_path), **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        op = build(retry_failed_requests=0, max_cost_usd=3.0)
    assert (op.retry_failed_requests, op.max_cost_usd) == (0, 3.0)
    assert (op.config.retry_failed_requests, op.config.max_cost_usd) == (0, 3.0)  # what the run reads
    with pytest.warns(DeprecationWarning, match=r"pass max_cost_usd= to the operator"):
        op = build(config=OpenAIBatchConfig(max_cost_usd=7.0))
    assert op.max_cost_usd == 7.0
    with pytest.warns(DeprecationWarning, match=r"pass config=OpenAIBatchConfig\(endpoint=..., wait_for_comp"):
        op = build(endpoint="/v1/embeddings", wait_for_completion=False)
    assert (op.endpoint, op.wait_for_completion) == ("/v1/embeddings", False)


def test_max_cost_usd_refuses_before_any_upload(server, tmp_path) -> None:
    from airflow_provider_synth.exceptions import BudgetExceededError

    with pytest.raises(BudgetExceededError, match=r"is over max_cost_usd=\$1e-09; nothing was submitted"):
        make_op(tmp_path, max_cost_usd=1e-9).execute(context())
    assert server.counters["files_created"] == 0 and server.counters["batches_created"] == 0
