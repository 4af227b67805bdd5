"""The Bedrock run end to end with real parts: the real boto3 client and the amazon provider's hook against the
local Bedrock control-plane stand-in, which reads its input from and writes its output to moto's S3 server;
every staged and read-back file goes through the ``aws`` connection. Faults: a partially completing job, a
throttled create, a lost create response, a kill after create, a failed and an expired job."""

from __future__ import annotations

import json
import time

import pytest

from airflow_provider_synth.batch.errors import InvalidRequestsError
from airflow_provider_synth.hooks.bedrock import BedrockBatchHook
from airflow_provider_synth.runs.bedrock import BedrockPlan, BedrockRun, prepare
from airflow_provider_synth.runs.bedrock_mapping import BedrockLimits
from airflow_provider_synth.server.bedrock import RecordFault

pytestmark = pytest.mark.integration

ROLE = "arn:aws:iam::123456789012:role/bedrock-batch"
LLAMA = "meta.llama3-1-8b-instruct-v1:0"
KEY = ("dag", "task", "run1", -1)


def chat_lines(n, *, marker=lambda i: "", model=LLAMA, **body):
    return [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model, "max_tokens": 20, **body,
                                 "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": f"question {i} {marker(i)}"}]}})
            for i in range(n)]


def write_input(bedrock, lines, key="in/requests.jsonl"):
    bedrock.bucket.write(key, ("\n".join(lines) + "\n").encode())
    return bedrock.bucket.url(key)


def make_run(bedrock, lines, *, model=LLAMA, max_rounds=2, max_active_jobs=None, **kw):
    source = write_input(bedrock, lines)
    plan = prepare(source, key_parts=KEY, model_id=model, role_arn=ROLE, staging_prefix=bedrock.bucket.url("stage"),
                   conn_id="aws_default", output_dir=bedrock.bucket.url("out"), **kw)
    return BedrockRun(BedrockBatchHook(aws_conn_id="aws_default"), plan, max_rounds=max_rounds,
                      max_active_jobs=max_active_jobs)


def drive(run, deadline_s=60, waves=None):
    """attach -> submit -> poll until finished -> next rounds; then collect (what the operator does)."""
    run.attach()
    while True:
        run.submit()
        if waves is not None:
            waves.append(len(run.running))
        end = time.time() + deadline_s
        while any(not ref.finished for ref in run.jobs.values()):
            assert time.time() < end, run.states()
            time.sleep(0.05)
            assert run.poll() == []
        if not run.next_round():
            return run.collect()


def read_jsonl(bedrock, key):
    return [json.loads(x) for x in bedrock.bucket.read(key).splitlines()]


def test_a_completed_job_lands_every_answer_matched_to_its_custom_id(bedrock):
    run = make_run(bedrock, chat_lines(120))
    acct = drive(run)
    assert (acct.total, acct.succeeded, acct.failed, acct.missing) == (120, 120, 0, 0)
    results = read_jsonl(bedrock, "out/results.jsonl")
    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(120)]
    body = results[7]["response"]["body"]
    assert body["choices"][0]["message"]["content"] == "Answer to: question 7 "
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    # the records Bedrock read: recordId + the native Llama body, staged through the connection
    staged = read_jsonl(bedrock, f"stage/{run.plan.key}/s00000-r0/records.jsonl")
    assert staged[0]["recordId"] == "R0000000000" and staged[0]["modelInput"]["max_gen_len"] == 20
    assert staged[0]["modelInput"]["prompt"].startswith("<|begin_of_text|><|start_header_id|>system")
    assert bedrock.counters["jobs_created"] == 1
    manifest = run.manifest(acct, "completed")
    assert manifest["cost_usd"] > 0 and manifest["job_arns"] == list(run.states())


def test_partially_completed_lands_what_succeeded_and_retries_only_what_a_retry_can_fix(bedrock):
    bedrock.record_faults = [RecordFault("THROTTLED", 429, times=1), RecordFault("BROKEN", 400, times=None)]
    marker = {3: "THROTTLED", 50: "THROTTLED", 90: "BROKEN"}
    run = make_run(bedrock, chat_lines(110, marker=lambda i: marker.get(i, "")), pad_to_minimum=True)
    acct = drive(run)
    assert (acct.succeeded, acct.failed, acct.missing) == (109, 1, 0)
    assert sorted(run.jobs) == [(0, 0), (0, 1)]  # round 1: the two throttled records, padded
    assert run.jobs[(0, 0)].state["status"] == "PartiallyCompleted"
    round1 = read_jsonl(bedrock, f"stage/{run.plan.key}/s00000-r1/requests.jsonl")
    assert [r["custom_id"] for r in round1] == ["req-3", "req-50"]
    assert run.plan.padding == {"0-1": 98}
    failures = read_jsonl(bedrock, "out/failures.jsonl")
    assert [(f["custom_id"], f["status_code"], f["retryable"]) for f in failures] == [("req-90", 400, False)]
    assert bedrock.counters["jobs_created"] == 2


def test_a_retry_round_below_the_minimum_is_not_submitted_without_padding(bedrock):
    bedrock.record_faults = [RecordFault("THROTTLED", 429, times=None)]
    run = make_run(bedrock, chat_lines(100, marker=lambda i: "THROTTLED" if i == 5 else ""))
    acct = drive(run)
    assert (acct.succeeded, acct.failed) == (99, 1)
    assert bedrock.counters["jobs_created"] == 1


def test_a_throttled_create_and_a_lost_create_response_still_create_one_job(bedrock):
    bedrock.throttle_creates, bedrock.lose_create_responses = 1, 1
    run = make_run(bedrock, chat_lines(100))
    acct = drive(run)
    assert acct.succeeded == 100
    assert bedrock.counters["jobs_created"] == 1 and bedrock.counters["idempotent_replays"] == 1
    assert bedrock.counters["throttled"] == 1 and bedrock.counters["lost_responses"] == 1


def test_a_create_throttled_past_botocore_s_retries_fails_the_try_and_the_next_try_creates_once(bedrock):
    from botocore.exceptions import ClientError

    bedrock.throttle_creates = 50
    run = make_run(bedrock, chat_lines(100))
    run.attach()
    with pytest.raises(ClientError) as info:
        run.submit()
    assert run.is_transient(info.value)
    bedrock.throttle_creates = 0
    retry = BedrockRun(BedrockBatchHook(aws_conn_id="aws_default"), BedrockPlan.load(run.plan.staging))
    assert drive(retry).succeeded == 100
    assert bedrock.counters["jobs_created"] == 1


def test_a_worker_killed_after_create_before_recording_re_attaches_to_the_same_job(bedrock, monkeypatch):
    run = make_run(bedrock, chat_lines(100))
    run.attach()
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(BedrockRun, "_record", lambda self: (_ for _ in ()).throw(SystemExit("worker killed")))
        run.submit()
    assert bedrock.counters["jobs_created"] == 1
    retry = BedrockRun(BedrockBatchHook(aws_conn_id="aws_default"), BedrockPlan.load(run.plan.staging))
    retry.attach()
    assert retry.todo == [(0, 0)]  # nothing recorded: the try asks again, with the same token
    assert retry.submit() == []  # the job the killed try created, not a new one
    assert retry.counts == {"created": 0, "reattached": 1, "padding": 0}
    assert bedrock.counters["jobs_created"] == 1
    assert drive(retry).succeeded == 100


def test_a_kill_stops_the_job_and_the_retry_submits_only_what_the_stop_left(bedrock):
    bedrock.step_s = 0.5
    run = make_run(bedrock, chat_lines(100))
    run.attach()
    run.submit()
    assert run.cancel() == list(run.states())
    while not all(ref.finished for ref in run.jobs.values()):
        time.sleep(0.05)
        run.poll()
    assert list(run.states().values()) == ["Stopped"]
    assert bedrock.counters["stop_requests"] == 1
    bedrock.step_s = 0.05
    retry = BedrockRun(BedrockBatchHook(aws_conn_id="aws_default"), BedrockPlan.load(run.plan.staging))
    acct = drive(retry)
    assert acct.succeeded == 100
    assert [k for k in sorted(retry.jobs)] == [(0, 0), (0, 1)]


def test_an_expired_job_keeps_its_answers_and_retries_the_rest(bedrock):
    bedrock.expire_jobs = 1
    run = make_run(bedrock, chat_lines(200))
    acct = drive(run)
    assert acct.succeeded == 200
    assert [run.jobs[k].state["status"] for k in sorted(run.jobs)] == ["Expired", "Completed"]
    assert len(read_jsonl(bedrock, f"stage/{run.plan.key}/s00000-r1/requests.jsonl")) == 100


def test_a_failed_job_fails_its_records_with_the_job_s_message(bedrock):
    bedrock.min_records = 500  # the account's quota is higher than the run was told
    run = make_run(bedrock, chat_lines(100))
    acct = drive(run)
    assert (acct.succeeded, acct.failed) == (0, 100)
    failure = read_jsonl(bedrock, "out/failures.jsonl")[0]
    assert failure["error"]["code"] == "job_failed" and "minimum of 500" in failure["error"]["message"]
    assert failure["retryable"] is False and bedrock.counters["jobs_created"] == 1


def test_records_split_evenly_over_jobs_within_the_limits_in_waves(bedrock):
    bedrock.min_records = 2
    run = make_run(bedrock, chat_lines(12), limits=BedrockLimits(min_records=2, max_records=5), max_active_jobs=2)
    assert run.plan.shards == [4, 4, 4]
    waves = []
    acct = drive(run, waves=waves)
    assert waves == [2, 1]  # never more than max_active_jobs in flight
    assert acct.succeeded == 12 and bedrock.counters["jobs_created"] == 3
    assert [r["custom_id"] for r in read_jsonl(bedrock, "out/results.jsonl")] == [f"req-{i}" for i in range(12)]


def test_below_the_minimum_is_refused_before_anything_is_staged(bedrock):
    with pytest.raises(InvalidRequestsError, match="at least 100 records.*pad_to_minimum=True"):
        make_run(bedrock, chat_lines(30))
    assert bedrock.bucket.keys("stage") == []


def test_what_a_family_cannot_take_is_refused_with_file_line_and_custom_id(bedrock):
    lines = chat_lines(120)
    lines[4] = lines[4].replace('"max_tokens": 20', '"max_tokens": 20, "tools": [{"type": "function", '
                                '"function": {"name": "f"}}]')
    with pytest.raises(InvalidRequestsError) as info:
        make_run(bedrock, lines)
    assert "requests.jsonl:5 custom_id='req-4': Meta Llama has no equivalent of tools" in str(info.value)
    assert bedrock.bucket.keys("stage") == [] and bedrock.counters["create_requests"] == 0


@pytest.mark.parametrize("model", ["mistral.mistral-7b-instruct-v0:2", "us.amazon.nova-lite-v1:0"])
def test_other_chat_families_round_trip(bedrock, model):
    run = make_run(bedrock, chat_lines(100, model=model, stop=["\n\n"]), model=model)
    acct = drive(run)
    assert acct.succeeded == 100
    body = read_jsonl(bedrock, "out/results.jsonl")[0]["response"]["body"]
    assert body["choices"][0]["message"]["content"].endswith("question 0 ")
    assert run.manifest(acct, "completed")["cost_usd"] > 0  # Mistral: from the jobs' manifests (no per-record usage)


def test_titan_embeddings_round_trip(bedrock):
    model = "amazon.titan-embed-text-v2:0"
    lines = [json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": model, "input": f"text {i}", "dimensions": 4}}) for i in range(100)]
    acct = drive(make_run(bedrock, lines, model=model))
    assert acct.succeeded == 100
    body = read_jsonl(bedrock, "out/results.jsonl")[0]["response"]["body"]
    assert len(body["data"][0]["embedding"]) == 4 and body["usage"]["prompt_tokens"] == 2


def test_claude_takes_the_anthropic_translation_with_bedrock_s_anthropic_version(bedrock):
    model = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    lines = chat_lines(100, model=model, temperature=0.2, stop=["END"])
    run = make_run(bedrock, lines, model=model)
    staged = read_jsonl(bedrock, f"stage/{run.plan.key}/s00000-r0/records.jsonl")[0]["modelInput"]
    assert staged == {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 20, "system": "Be brief.",
                      "messages": [{"role": "user", "content": "question 0 "}], "temperature": 0.2,
                      "stop_sequences": ["END"]}
    acct = drive(run)
    assert acct.succeeded == 100 and acct.usage.prompt_tokens > 0
    from airflow_provider_synth.batch.extract import extract_text

    assert extract_text(read_jsonl(bedrock, "out/results.jsonl")[0]) == "Answer to: question 0 "
    assert run.manifest(acct, "completed")["cost_usd"] > 0


def test_output_checks_apply_and_their_retry_body_is_translated_again(bedrock):
    from airflow_provider_synth.batch.checks import OutputChecks

    lines = [line.replace('"max_tokens": 20', '"max_tokens": 2') if i in (4, 9) else line
             for i, line in enumerate(chat_lines(100))]
    checks = OutputChecks(finish_reasons={"length"}, retry_body={"truncated": {"max_tokens": 40}})
    run = make_run(bedrock, lines, checks=checks, pad_to_minimum=True)
    acct = drive(run)
    assert (acct.succeeded, acct.failed) == (100, 0)
    assert acct.unusable["truncated"] == 2 and acct.unusable_retried == 2
    retried = read_jsonl(bedrock, f"stage/{run.plan.key}/s00000-r1/records.jsonl")
    assert [r["modelInput"]["max_gen_len"] for r in retried[:2]] == [40, 40]  # the retry body, in Llama's field
    assert run.manifest(acct, "completed")["checks"]["truncated"] == 2
