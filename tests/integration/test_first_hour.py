"""What a new user meets in the first hour: errors that say what to do, and no noise on the way."""

from __future__ import annotations

import pytest

from airflow_provider_synth.testing.dags import load_dag


@pytest.mark.integration
def test_a_missing_input_path_fails_naming_the_path_without_link_noise(airflow_db, openai_conn, tmp_path,
                                                                         monkeypatch, capfd) -> None:
    monkeypatch.setenv("SYNTH_OUTPUT_DIR", str(tmp_path))
    missing = tmp_path / "nowhere" / "requests.jsonl"
    dag = load_dag("example_openai_batch")
    task = dag.get_task("synthesize")
    task.input_path, task.requests = str(missing), None
    dr = dag.test(run_conf={"n_records": 3})
    assert dr.get_task_instance("synthesize").state == "failed"
    out = capfd.readouterr()
    log = out.out + out.err
    assert f"input_path {missing} does not exist; nothing was submitted" in log
    # Airflow reads the task's links as it ends: a link never persisted must not be looked up in XCom
    assert "XCom not found" not in log
    assert not openai_conn.batches()
