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
