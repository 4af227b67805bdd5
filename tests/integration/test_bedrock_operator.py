"""BedrockBatchOperator's deferral and resume against the Bedrock stand-in over moto's S3: the trigger's kwargs,
and execute_complete for every event status (None included)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_synth.exceptions import BatchTimeoutError, TriggerEventError, WaitFailedError
from airflow_provider_synth.operators.bedrock import BedrockBatchConfig, BedrockBatchOperator

pytestmark = pytest.mark.integration
MODEL = "meta.llama3-1-8b-instruct-v1:0"


def context():
    ti = SimpleNamespace(dag_id="d", task_id="t", run_id="r", map_index=-1, try_number=1,
                         xcom_push=lambda key, value: None)
    return {"ti": ti}


@pytest.fixture
def operator(bedrock, tmp_path):
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                          "body": {"model": MODEL, "max_tokens": 8,
                                                   "messages": [{"role": "user", "content": f"q{i}"}]}}) + "\n"
                              for i in range(100)))
    bedrock.step_s = 30.0  # still running when the task defers

    def make(**kwargs):
        return BedrockBatchOperator(task_id="t", input_path=str(source), output_path=str(tmp_path / "out"),
                                    model=MODEL, deferrable=True, poll_interval=5,
                                    config=BedrockBatchConfig(role_arn="arn:aws:iam::123456789012:role/r",
                                                              staging_prefix=bedrock.bucket.url("stage")),
                                    **kwargs)
    return make


def test_execute_defers_to_one_trigger_for_the_task_s_jobs(bedrock, operator):
    with pytest.raises(TaskDeferred) as deferred:
        operator().execute(context())
    path, kwargs = deferred.value.trigger.serialize()
    assert path == "airflow_provider_synth.triggers.bedrock.BedrockJobTrigger"
    assert kwargs["aws_conn_id"] == "aws_default" and kwargs["job_arns"] == list(bedrock.jobs)
    assert kwargs["poll_interval"] == 5 and kwargs["end_time"] > 0 and kwargs["cancel_on_kill"] is True
    staging = deferred.value.kwargs["staging"]  # the plan's folder, a URL keeping its connection, no secret
    assert list(deferred.value.kwargs) == ["staging"] and staging.startswith(bedrock.bucket.url("stage/"))
    assert "testing" not in json.dumps(kwargs)  # no credential in the stored trigger


@pytest.mark.parametrize("event", [None, {}, {"status": "odd", "jobs": {}}])
def test_execute_complete_refuses_an_unusable_event(operator, event):
    with pytest.raises(TriggerEventError):
        operator().execute_complete(context(), event)


def test_execute_complete_on_a_polling_error_fails_and_keeps_the_jobs(bedrock, operator):
    with pytest.raises(TaskDeferred) as deferred:
        operator().execute(context())
    event = {"status": "error", "message": "Polling job x failed: AccessDenied", "jobs": {}}
    with pytest.raises(WaitFailedError, match="AccessDenied"):
        operator().execute_complete(context(), event, **deferred.value.kwargs)
    assert bedrock.counters["stop_requests"] == 0


def test_execute_complete_at_the_deadline_stops_the_jobs_and_fails(bedrock, operator):
    with pytest.raises(TaskDeferred) as deferred:
        operator().execute(context())
    event = {"status": "timeout", "message": "Deadline passed", "jobs": {}}
    with pytest.raises(BatchTimeoutError, match="cancelled"):
        operator().execute_complete(context(), event, **deferred.value.kwargs)
    assert bedrock.counters["stop_requests"] == 1


def test_execute_complete_on_success_lands_the_output(bedrock, operator, tmp_path):
    with pytest.raises(TaskDeferred):
        operator().execute(context())
    bedrock.step_s = 0.01
    import time

    deadline = time.time() + 60
    while any(j.status != "Completed" for j in bedrock.jobs.values()):
        assert time.time() < deadline
        time.sleep(0.1)
    jobs = {arn: {"job_arn": arn, "status": "Completed"} for arn in bedrock.jobs}
    manifest = operator().execute_complete(context(), {"status": "success", "message": "done", "jobs": jobs})
    assert (manifest["succeeded"], manifest["total"]) == (100, 100)  # resumed without the deferral's kwargs
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 100


def test_requests_and_template_are_built_as_on_openai_and_the_estimate_is_logged(bedrock, tmp_path, caplog):
    import logging
    import warnings

    from airflow_provider_synth.batch.requests import RequestTemplate

    records = [{"id": f"r{i}", "q": i} for i in range(100)]
    template = RequestTemplate(prompt_template="About {q}", id_field="id", params={"max_tokens": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        op = BedrockBatchOperator(task_id="t", requests=records, template=template, model=MODEL,
                                  output_path=str(tmp_path / "out"), max_cost_usd=10.0, retry_failed_requests=1,
                                  config=BedrockBatchConfig(role_arn="arn:aws:iam::123456789012:role/r",
                                                            staging_prefix=bedrock.bucket.url("stage")))
    with caplog.at_level(logging.INFO):
        run = op.start_run(context())
    written = (tmp_path / "out" / "_work" / "requests.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in written] == list(template.build(records, model=MODEL))  # the OpenAI lines
    assert run.plan.total == 100 and run.max_rounds == 1
    assert "within max_cost_usd=$10.0" in caplog.text and "estimated cost $" in caplog.text


def test_the_old_keywords_still_work_with_a_deprecation_warning(bedrock, tmp_path):
    with pytest.warns(DeprecationWarning, match=r"config=BedrockBatchConfig\(role_arn=..., staging_prefix=...\)"):
        op = BedrockBatchOperator(task_id="t", input_path="x.jsonl", output_path=str(tmp_path), model=MODEL,
                                  role_arn="arn:aws:iam::1:role/r", staging_prefix="s3://b/p")
    assert (op.role_arn, op.staging_prefix, op.config.role_arn) == ("arn:aws:iam::1:role/r", "s3://b/p",
                                                                     "arn:aws:iam::1:role/r")
    op.role_arn = "arn:aws:iam::2:role/rendered"  # what Airflow's templating does to the field
    assert op.config.role_arn == "arn:aws:iam::2:role/rendered"
    with pytest.warns(DeprecationWarning, match=r"pass retry_failed_requests= to the operator"):
        op = BedrockBatchOperator(task_id="t", input_path="x.jsonl", output_path=str(tmp_path), model=MODEL,
                                  config=BedrockBatchConfig(role_arn="r", staging_prefix="s3://b/p",
                                                            retry_failed_requests=4))
    assert op.retry_failed_requests == 4
    with pytest.raises(ValueError, match="needs config.role_arn, config.staging_prefix"):
        BedrockBatchOperator(task_id="t", input_path="x.jsonl", output_path=str(tmp_path), model=MODEL)
