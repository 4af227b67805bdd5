"""Lineage and metrics in a real run: ``dag.test()`` with the OpenLineage provider's listener writing events to
a file, and Airflow's ``Stats`` sending StatsD packets to a UDP listener; both on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("airflow.providers.openlineage")
pytest.importorskip("statsd")
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("native_dag_runner.py")


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("native")
    home, out, events = tmp / "airflow", tmp / "out", tmp / "openlineage.jsonl"
    home.mkdir()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events),
                                                       "append": True}),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "synth-test",
        "SYNTH_OUTPUT_DIR": str(out),
    }
    dags = {"example_openai_batch": {"n_records": 30}, "example_synth_quiz_generate": {"n_records": 20}}
    config = {"dags": dags, "summary_path": str(tmp / "summary.json")}
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(config)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads((tmp / "summary.json").read_text())
    lines = events.read_text().splitlines() if events.exists() else []
    summary["events"] = [json.loads(x) for x in lines if x.strip()]
    return summary


def complete_event(summary: dict[str, Any], job: str) -> dict[str, Any]:
    found = [e for e in summary["events"] if e["eventType"] == "COMPLETE" and e["job"]["name"] == job]
    assert len(found) == 1, [(e["eventType"], e["job"]["name"]) for e in summary["events"]]
    return found[0]


def test_lineage_facets_name_input_output_and_the_runs_numbers(observed: dict[str, Any]) -> None:
    run = observed["runs"]["example_openai_batch"]
    assert run["state"] == "success"
    manifest = run["xcoms"]["synthesize"]
    event = complete_event(observed, "example_openai_batch.synthesize")
    # records became a request file in the work folder: that file is the input, the output folder the output
    assert event["inputs"] == [{"namespace": "file", "name": manifest["work_dir"] + "/requests.jsonl",
                                "facets": {}, "inputFacets": {}}]
    (output,) = event["outputs"]
    assert (output["namespace"], output["name"]) == ("file", manifest["output_dir"])
    facet = event["run"]["facets"]["synthBatch"]
    assert (facet["backend"], facet["model"], facet["total"], facet["succeeded"], facet["failed"]) == (
        "openai", "gpt-4o-mini", 30, 30, 0)
    assert facet["usage"]["prompt_tokens"] == manifest["usage"]["prompt_tokens"] > 0
    assert facet["costUsd"] == manifest["cost_usd"] > 0 and facet["batchIds"] == manifest["batch_ids"]
    assert facet["_schemaURL"].endswith("docs/native.md#lineage")


def test_taskflow_task_reports_lineage_too(observed: dict[str, Any]) -> None:
    manifest = observed["runs"]["example_synth_quiz_generate"]["xcoms"]["generate"]
    event = complete_event(observed, "example_synth_quiz_generate.generate")
    assert event["run"]["facets"]["synthBatch"]["total"] == 20
    assert event["outputs"][0]["name"] == manifest["output_dir"]


def counters(observed: dict[str, Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for line in observed["statsd"]:
        name, _, rest = line.partition(":")
        value, _, kind = rest.partition("|")
        if name.startswith("airflow.synth.") and kind.startswith("c"):
            totals[name] = totals.get(name, 0) + int(value)
    return totals


def test_metrics_count_requests_failures_tokens_and_cost(observed: dict[str, Any]) -> None:
    m1 = observed["runs"]["example_openai_batch"]["xcoms"]["synthesize"]
    m2 = observed["runs"]["example_synth_quiz_generate"]["xcoms"]["generate"]
    got = counters(observed)
    assert got["airflow.synth.openai.requests"] == 30 + 20
    assert got["airflow.synth.openai.requests.succeeded"] == 50
    assert "airflow.synth.openai.requests.failed" not in got  # zero counts are not sent
    assert got["airflow.synth.openai.tokens.input"] == m1["usage"]["prompt_tokens"] + m2["usage"]["prompt_tokens"]
    assert got["airflow.synth.openai.tokens.output"] == (m1["usage"]["completion_tokens"]
                                                         + m2["usage"]["completion_tokens"])
    assert got["airflow.synth.openai.cost_microusd"] == round(m1["cost_usd"] * 1e6) + round(m2["cost_usd"] * 1e6)
