"""BedrockJobTrigger on the amazon provider's aiobotocore client against the local Bedrock stand-in (jobs over
moto's S3): one terminal event for all of a task's jobs, no blocking call, an absolute deadline, stop on kill."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_provider_synth.hooks.bedrock import BedrockBatchHook
from airflow_provider_synth.triggers import base as trigger_base
from airflow_provider_synth.triggers.bedrock import BedrockJobTrigger

pytestmark = pytest.mark.integration
ROLE = "arn:aws:iam::123456789012:role/bedrock-batch"


def _job(bedrock, name: str, n: int = 100, marker: str = "") -> str:
    lines = [json.dumps({"recordId": f"R{i:010d}", "modelInput": {"prompt": f"q {i} {marker if i == 0 else ''}",
                                                                   "max_gen_len": 5}}) for i in range(n)]
    bedrock.bucket.write(f"{name}/records.jsonl", "\n".join(lines).encode())
    return BedrockBatchHook(aws_conn_id="aws_default").create_job(
        job_name=name, role_arn=ROLE, model_id="meta.llama3-1-8b-instruct-v1:0",
        input_uri=f"s3://{bedrock.bucket.bucket}/{name}/records.jsonl",
        output_uri=f"s3://{bedrock.bucket.bucket}/{name}/out/", client_request_token=f"tok{name}")


async def _events(trigger: BedrockJobTrigger) -> list[dict[str, Any]]:
    return [event.payload async for event in trigger.run()]


def test_serialize_round_trip_is_json_primitives():
    trigger = BedrockJobTrigger("aws_x", ["arn:1", "arn:2"], region_name="eu-west-1", poll_interval=30,
                                end_time=1_900_000_000.5)
    path, kwargs = trigger.serialize()
    assert path == "airflow_provider_synth.triggers.bedrock.BedrockJobTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert BedrockJobTrigger(**kwargs).serialize() == (path, kwargs)
    with pytest.raises(ValueError):
        BedrockJobTrigger("aws_x", [])


async def test_one_event_for_all_jobs_and_never_the_sync_client(bedrock, monkeypatch):
    from airflow_provider_synth.server.bedrock import RecordFault

    bedrock.record_faults = [RecordFault("BROKEN", 400, times=None)]
    arns = [_job(bedrock, "ja"), _job(bedrock, "jb", marker="BROKEN")]
    monkeypatch.setattr(BedrockBatchHook, "get_job", lambda *a, **k: pytest.fail("sync call in the trigger"))
    events = await _events(BedrockJobTrigger("aws_default", arns, poll_interval=0.05))
    assert len(events) == 1
    event = events[0]
    assert event["status"] == "success"
    assert {a: s["status"] for a, s in event["jobs"].items()} == dict(zip(arns, ["Completed", "PartiallyCompleted"], strict=True))
    assert event["message"] == "All 2 Bedrock jobs finished: 1 Completed, 1 PartiallyCompleted."
    assert "testing" not in json.dumps(event)  # no credential in the event


async def test_the_deadline_is_absolute_and_survives_recreation(bedrock, monkeypatch):
    bedrock.step_s = 60
    arn = _job(bedrock, "slow")
    clock = {"now": 1_000.0}
    monkeypatch.setattr(trigger_base, "_now", lambda: clock["now"])
    trigger = BedrockJobTrigger("aws_default", [arn], poll_interval=0.01, end_time=1_000.5)
    recreated = BedrockJobTrigger(**trigger.serialize()[1])
    clock["now"] = 1_001.0
    (event,) = await _events(recreated)
    assert event["status"] == "timeout" and arn in event["message"]


async def test_an_unknown_status_ends_the_wait_with_an_error(bedrock):
    bedrock.step_s = 60
    arn = _job(bedrock, "odd")
    bedrock.jobs[arn].status = "Hibernating"
    (event,) = await _events(BedrockJobTrigger("aws_default", [arn], poll_interval=0.01))
    assert event["status"] == "error" and "unknown status 'Hibernating'" in event["message"]


async def test_a_missing_job_is_a_fatal_polling_error(bedrock):
    arn = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abcdefabcdef"
    (event,) = await _events(BedrockJobTrigger("aws_default", [arn], poll_interval=0.01))
    assert event["status"] == "error" and "ResourceNotFoundException" in event["message"]


async def test_on_kill_stops_the_jobs_still_running(bedrock):
    bedrock.step_s = 60
    arns = [_job(bedrock, "k1"), _job(bedrock, "k2")]
    trigger = BedrockJobTrigger("aws_default", arns, poll_interval=0.01)
    await trigger.on_kill()
    assert bedrock.counters["stop_requests"] == 2
    assert {bedrock.jobs[a].status for a in arns} == {"Stopping"}
