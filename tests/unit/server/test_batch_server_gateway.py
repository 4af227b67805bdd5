"""The local server as a batch gateway (``--upstream``), and its persistence across restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from openai import OpenAI

from airflow_provider_synth.server import answers
from airflow_provider_synth.server.server import BatchServer, Outcome

CHAT = "/v1/chat/completions"
UPSTREAM_KEY = "sk-upstream-secret"


class Upstream:
    """A small OpenAI-compatible chat server whose behaviour depends on the prompt text."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.models: set[str] = set()
        self.auth: set[str] = set()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.released = asyncio.Event()

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["messages"][0]["content"]
        self.calls[prompt] += 1
        self.models.add(body["model"])
        self.auth.add(request.headers.get("Authorization", ""))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)
            return await self._answer(prompt, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, prompt: str, body: dict[str, Any]) -> web.Response:
        kind, calls = prompt.split("-")[0], self.calls[prompt]
        if kind == "flaky" and calls <= 2:
            return web.json_response({"error": {"message": "try again", "type": "server_error"}}, status=500)
        if kind == "limited" and calls == 1:
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"retry-after": "0.05"})
        if kind == "bad":
            return web.json_response({"error": {"message": "bad prompt", "type": "invalid_request_error",
                                                "param": "messages", "code": "bad_prompt"}}, status=400)
        if kind == "down":
            return web.Response(text="Service Unavailable", status=503)
        if kind == "slow":  # answers only after the gateway gave up on it (released when the test ends)
            await self.released.wait()
        return web.json_response(answers.chat_completion(body, "upstream", content=f"upstream answer to {prompt}"))

    def start(self) -> Upstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self.released.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


def lines_for(prompts: list[str], model: str = "gpt-4o-mini") -> bytes:
    rows = [{"custom_id": p, "method": "POST", "url": CHAT,
             "body": {"model": model, "messages": [{"role": "user", "content": p}]}} for p in prompts]
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def run_batch(client: OpenAI, data: bytes, timeout: float = 20) -> Any:
    uploaded = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + timeout
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.02)
        batch = client.batches.retrieve(batch.id)
    return batch


def read(client: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if not file_id:
        return {}
    return {(row := json.loads(x))["custom_id"]: row for x in client.files.content(file_id).text.splitlines()}


def test_gateway_runs_requests_upstream_with_retries_and_bounded_concurrency(
    upstream: Upstream, batch_server_factory: Callable[..., BatchServer]
) -> None:
    srv = batch_server_factory(
        upstream_url=f"http://127.0.0.1:{upstream.port}/v1", upstream_api_key=UPSTREAM_KEY, upstream_concurrency=3,
        upstream_timeout_s=1.0, upstream_retries=3, upstream_model="local-llama", in_progress_s=0.0,
    )
    srv.set_outcome("forced-*", Outcome.error(500))
    client = OpenAI(base_url=srv.base_url, api_key="sk-test")
    prompts = [f"ok-{i}" for i in range(12)] + ["flaky-1", "limited-1", "bad-1", "down-1", "slow-1", "forced-1"]
    batch = run_batch(client, lines_for(prompts))

    assert batch.status == "completed"
    good, errors = read(client, batch.output_file_id), read(client, batch.error_file_id)
    assert set(good) == {f"ok-{i}" for i in range(12)} | {"flaky-1", "limited-1"}
    assert good["flaky-1"]["response"]["body"]["choices"][0]["message"]["content"] == "upstream answer to flaky-1"
    assert good["ok-0"]["response"]["body"]["model"] == "gpt-4o-mini", "the batch's model name is kept"
    assert upstream.calls["flaky-1"] == 3 and upstream.calls["limited-1"] == 2
    assert errors["bad-1"]["response"]["status_code"] == 400
    assert errors["bad-1"]["response"]["body"]["error"]["code"] == "bad_prompt"
    assert upstream.calls["bad-1"] == 1, "a 400 is not retried"
    assert errors["down-1"]["response"]["status_code"] == 503 and upstream.calls["down-1"] == 3
    assert "Service Unavailable" in errors["down-1"]["response"]["body"]["error"]["message"]
    assert errors["slow-1"]["response"] is None and errors["slow-1"]["error"]["code"] == "request_timeout"
    assert errors["forced-1"]["response"]["status_code"] == 500 and upstream.calls["forced-1"] == 0
    assert upstream.max_in_flight <= 3
    assert upstream.models == {"local-llama"} and upstream.auth == {f"Bearer {UPSTREAM_KEY}"}
    assert batch.usage is not None and batch.usage.input_tokens > 0


def test_gateway_reports_an_unreachable_upstream_per_request(batch_server_factory: Callable[..., BatchServer]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = batch_server_factory(upstream_url=f"http://127.0.0.1:{port}/v1", upstream_retries=2, in_progress_s=0.0)
    client = OpenAI(base_url=srv.base_url, api_key="sk-test")
    batch = run_batch(client, lines_for(["a", "b"]))
    errors = read(client, batch.error_file_id)
    assert batch.output_file_id is None and set(errors) == {"a", "b"}
    assert errors["a"]["response"]["status_code"] == 502
    assert errors["a"]["response"]["body"]["error"]["code"] == "upstream_unreachable"


def test_state_survives_a_restart_in_process(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    with BatchServer(state_dir=state, validating_s=0.01, in_progress_s=0.05, finalizing_s=0.01) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="sk-test")
        done = run_batch(client, lines_for(["x", "y"]))
        output = client.files.content(done.output_file_id).text  # type: ignore[arg-type]
    with BatchServer(state_dir=state) as again:
        client = OpenAI(base_url=again.base_url, api_key="sk-test")
        assert [b.id for b in client.batches.list()] == [done.id]
        assert client.batches.retrieve(done.id).status == "completed"
        assert client.files.content(done.output_file_id).text == output  # type: ignore[arg-type]
        assert {f.id for f in client.files.list()} >= {done.input_file_id, done.output_file_id}


def test_a_killed_server_resumes_its_batches_after_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"validating_s": 0.01, "in_progress_s": 4.0, "progress_steps": 20,
                                  "finalizing_s": 0.01, "shuffle_output": False}))

    def start() -> tuple[subprocess.Popen[bytes], OpenAI]:
        port_file = tmp_path / "port"
        port_file.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow_provider_synth.server", "--port", "0", "--port-file",
             str(port_file), "--state-dir", str(state), "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
        )
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        return proc, OpenAI(base_url=f"http://127.0.0.1:{port_file.read_text()}/v1", api_key="sk-test")

    proc, client = start()
    try:
        prompts = [f"p{i}" for i in range(40)]
        uploaded = client.files.create(file=("in.jsonl", lines_for(prompts)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
        deadline = time.monotonic() + 20
        while (counts := client.batches.retrieve(batch.id).request_counts) is None or counts.completed < 8:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert counts.completed < 40, "killed mid-batch"

    proc, client = start()
    try:
        resumed = client.batches.retrieve(batch.id)
        assert resumed.status == "in_progress" and resumed.request_counts is not None
        assert resumed.request_counts.completed >= counts.completed
        deadline = time.monotonic() + 20
        while resumed.status != "completed":
            assert time.monotonic() < deadline, resumed.status
            time.sleep(0.05)
            resumed = client.batches.retrieve(batch.id)
        rows = [json.loads(x) for x in client.files.content(resumed.output_file_id).text.splitlines()]  # type: ignore[arg-type]
        assert [r["custom_id"] for r in rows] == prompts, "every request exactly once, none lost or repeated"
        assert resumed.request_counts is not None and resumed.request_counts.completed == 40
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
