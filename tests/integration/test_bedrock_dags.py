"""The Bedrock example DAG under real Airflow ``dag.test()``: the real boto3 client and the amazon provider's
hook against the local Bedrock stand-in, records and answers in moto's S3 through the ``aws_default``
connection; plain (worker-side wait) and deferrable (the trigger in-process, aiobotocore)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("bedrock_dag_runner.py")


def run_dag(tmp_path, bedrock, dag_id, *, deferrable):
    home = tmp_path / "airflow"
    home.mkdir()
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": str(deferrable),
           "SYNTH_OUTPUT_DIR": bedrock.bucket.url("out"), "SYNTH_BEDROCK_STAGING": bedrock.bucket.url("stage"),
           "SYNTH_BEDROCK_POLL_S": "0.2"}
    config = {"dag_file": str(ROOT / "example_dags" / f"{dag_id}.py"), "dag_id": dag_id}
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(config)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


@pytest.mark.parametrize("deferrable", [False, True])
def test_example_bedrock_batch_lands_every_answer(tmp_path, bedrock, deferrable):
    from airflow_provider_synth.server.bedrock import RecordFault

    bedrock.record_faults = [RecordFault("product 7.", 429, times=1)]  # one throttled record: a retry round
    summary, logs = run_dag(tmp_path, bedrock, "example_bedrock_batch", deferrable=deferrable)
    assert summary["state"] == "success", logs[-4000:]
    assert {t: s["state"] for t, s in summary["tasks"].items()} == {
        "build_prompts": "success", "synthesize": "success", "embed": "success", "report": "success"}
    answers = summary["tasks"]["synthesize"]["xcom"]
    assert (answers["backend"], answers["total"], answers["succeeded"], answers["failed"]) == ("bedrock", 100, 100, 0)
    assert answers["rounds"] == 2 and answers["padding_records"] == 99 and answers["cost_usd"] > 0
    assert answers["run_id"] == summary["run_id"] and len(answers["job_arns"]) == 2
    vectors = summary["tasks"]["embed"]["xcom"]
    assert (vectors["total"], vectors["succeeded"], vectors["family"]) == (100, 100, "Amazon Titan embeddings")
    results = [json.loads(x) for x in bedrock.bucket.read(
        answers["results_path"].split(bedrock.bucket.bucket + "/", 1)[1]).splitlines()]
    assert [r["custom_id"] for r in results] == [f"SKU-{i:04d}" for i in range(100)]
    assert bedrock.counters["jobs_created"] == 3
    assert "testing" not in json.dumps(summary)  # the connection's keys are in no XCom
    if deferrable:
        assert "BedrockJobTrigger" in logs or "Bedrock job" in logs
