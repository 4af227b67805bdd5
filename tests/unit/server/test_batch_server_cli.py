"""``python -m airflow_provider_synth.server``: a real process, driven over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import orjson
import pytest
from openai import OpenAI

from airflow_provider_synth.server.server import config_from_args

SECRET = "sk-cli-secret-value-123"


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp_path / "port"
    env = {**os.environ, "SYNTH_SERVER_API_KEY": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_synth.server", "--port", "0", "--port-file", str(port_file),
         "--log-level", "DEBUG", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text()):
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def test_cli_serves_with_a_config_file_and_never_prints_the_key(tmp_path: Path) -> None:
    config = tmp_path / "server.json"
    config.write_text(json.dumps({
        "in_progress_s": 0.05, "validating_s": 0.01, "finalizing_s": 0.01,
        "outcomes": [{"pattern": "bad-*", "outcome": {"kind": "error", "status": 500}}],
    }))
    proc, port = _start(tmp_path, "--config", str(config))
    try:
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0).models.list()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=SECRET)
        lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": cid}]}}
                 for cid in ("good-1", "bad-1")]
        uploaded = client.files.create(file=("in.jsonl", b"\n".join(orjson.dumps(x) for x in lines)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 10
        while batch.status != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
            batch = client.batches.retrieve(batch.id)
        assert batch.request_counts is not None and (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    text = out.decode()
    assert f"Local Batch API server on http://127.0.0.1:{port}/v1" in text
    assert SECRET not in text


def test_cli_state_dir_and_flags_override_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"poll_delay_s": 1.0, "seed": 7}))
    parsed = config_from_args(["--config", str(config), "--poll-delay-s", "0.5", "--state-dir", str(tmp_path / "s")])
    assert (parsed.poll_delay_s, parsed.seed, parsed.state_dir) == (0.5, 7, str(tmp_path / "s"))
    config.write_text(json.dumps({"no_such_setting": 1}))
    result = subprocess.run(
        [sys.executable, "-m", "airflow_provider_synth.server", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "no_such_setting" in result.stderr


def _doc_block(marker: str) -> str:
    """The fenced block right after ``<!-- marker -->`` in docs/testing_server.md."""
    import re

    page = (Path(__file__).resolve().parents[3] / "docs" / "testing_server.md").read_text()
    found = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", page, re.S)
    assert found, f"no <!-- {marker} --> block in docs/testing_server.md"
    return found.group(1)


def test_the_docs_config_example_runs_as_written(tmp_path: Path) -> None:
    """docs/testing_server.md's ``--config`` example (issue 21: the docs had none): the file and the command
    as the page shows them (only the port becomes a free one), every rule it describes taking effect."""
    import shlex

    (tmp_path / "server.json").write_text(_doc_block("server-config-example"))
    argv = shlex.split(_doc_block("server-config-command").strip())
    assert argv[:3] == ["python", "-m", "airflow_provider_synth.server"]
    args = argv[3:]
    args[args.index("--port"):args.index("--port") + 2] = []
    args[args.index("--config") + 1] = str(tmp_path / "server.json")
    proc, port = _start(tmp_path, *args)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=SECRET)
        ids = ("ok-1", "flaky-1", "bad-1", "late-1")
        lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": cid}]}} for cid in ids]
        raw = client.files.with_raw_response.create(
            file=("in.jsonl", b"\n".join(orjson.dumps(x) for x in lines)), purpose="batch")
        assert int(raw.retries_taken) == 1  # the 429 fault on the first upload, retried by the SDK
        batch = client.batches.create(input_file_id=raw.parse().id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 30
        while batch.status not in ("completed", "expired"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
            batch = client.batches.retrieve(batch.id)
        out = [orjson.loads(x) for x in client.files.content(batch.output_file_id).content.splitlines() if x] \
            if batch.output_file_id else []
        err = [orjson.loads(x) for x in client.files.content(batch.error_file_id).content.splitlines() if x]
        got = {r["custom_id"]: (r["response"] or {}).get("status_code") or r["error"]["code"] for r in out + err}
        assert got == {"ok-1": 200, "flaky-1": 500, "bad-1": 400, "late-1": "batch_expired"}, got
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
