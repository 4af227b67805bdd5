"""A slow upstream is never a failure: the gateway against a deliberately slow, capped engine (issue 24).

The fake engine is an OpenAI-compatible server on 127.0.0.1 that behaves like vLLM on a small CPU: at most
``max_num_seqs`` requests run together, the rest wait in its own queue (published on ``/metrics`` as vLLM
does, or not at all, as llama.cpp without ``--metrics``), each engine step costs more the more requests run, and
a request whose client gave up is aborted. Sent everything at once with a client timeout that is shorter than
the queue, the old gateway timed requests out, sent them again and failed them; the gateway must answer every
request once, fail none, and send none twice.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import orjson
import pytest
from aiohttp import web
from openai import OpenAI

from airflow_provider_synth.server import answers
from airflow_provider_synth.server.concurrency import AdaptiveLimit
from airflow_provider_synth.server.server import BatchServer
from airflow_provider_synth.server.upstream import parse_waiting

CHAT: Final = "/v1/chat/completions"


@dataclass
class _Seq:
    prompt: str
    tokens: int
    queued_at: float
    done: asyncio.Future[None]
    generated: int = 0
    started_at: float | None = None


@dataclass
class SlowEngine:
    """A capped, continuously batching engine that generates ``answer_tokens`` tokens per request; one step
    takes ``step_s + per_seq_s * running`` seconds (compute-bound, as a CPU is)."""

    max_num_seqs: int = 4
    answer_tokens: int = 10
    step_s: float = 0.005
    per_seq_s: float = 0.01
    metrics: bool = True
    calls: Counter[str] = field(default_factory=Counter)
    aborted: int = 0
    longest_wait_s: float = 0.0
    most_waiting: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._work = asyncio.Event()

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        self.calls[prompt] += 1
        seq = _Seq(prompt, self.answer_tokens, time.monotonic(), self._loop.create_future())
        self.waiting.append(seq)
        self.most_waiting = max(self.most_waiting, len(self.waiting))
        self._work.set()
        try:
            await seq.done
        except asyncio.CancelledError:  # the client went away: vLLM aborts the request
            self.aborted += 1
            if seq in self.waiting:
                self.waiting.remove(seq)
            if seq in self.running:
                self.running.remove(seq)
            raise
        answer = answers.chat_completion(body, "slow-engine", content=f"answer to {prompt}")
        answer["usage"] = {"prompt_tokens": 5, "completion_tokens": seq.tokens, "total_tokens": 5 + seq.tokens}
        return web.json_response(answer)

    async def prometheus(self, request: web.Request) -> web.Response:
        if not self.metrics:
            raise web.HTTPNotFound()
        return web.Response(text=(
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="slow"}} {float(len(self.waiting))}\n'
            f'vllm:num_requests_running{{engine="0",model_name="slow"}} {float(len(self.running))}\n'))

    async def _engine(self) -> None:
        while True:
            while self.waiting and len(self.running) < self.max_num_seqs:
                seq = self.waiting.pop(0)
                seq.started_at = time.monotonic()
                self.longest_wait_s = max(self.longest_wait_s, seq.started_at - seq.queued_at)
                self.running.append(seq)
            if not self.running:
                self._work.clear()
                await self._work.wait()
                continue
            await asyncio.sleep(self.step_s + self.per_seq_s * len(self.running))
            for seq in list(self.running):
                seq.generated += 1
                if seq.generated >= seq.tokens:
                    self.running.remove(seq)
                    if not seq.done.done():
                        seq.done.set_result(None)

    def start(self) -> SlowEngine:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post(CHAT, self.chat)
        app.router.add_get("/metrics", self.prometheus)
        self._runner = web.AppRunner(app, handler_cancellation=True)  # a client gone: the request aborted
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._task = self._loop.create_task(self._engine())

    def stop(self) -> None:
        async def down() -> None:
            self._task.cancel()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(params=[True, False], ids=["with-metrics", "latency-only"])
def engine(request: pytest.FixtureRequest) -> Iterator[SlowEngine]:
    server = SlowEngine(metrics=request.param).start()
    yield server
    server.stop()


def test_a_slow_capped_upstream_answers_every_request_once(
    engine: SlowEngine, batch_server_factory: Callable[..., BatchServer]
) -> None:
    # 32 at once would queue 28 requests inside the engine for up to ~3 s, past the 2 s the old gateway waited
    srv = batch_server_factory(upstream_url=f"http://127.0.0.1:{engine.port}/v1", upstream_concurrency=32,
                               upstream_timeout_s=2.0, upstream_retries=3, in_progress_s=0.0, progress_steps=1,
                               validating_s=0.0, finalizing_s=0.0)
    client = OpenAI(base_url=srv.base_url, api_key="sk-test")
    prompts = [f"p-{i}" for i in range(60)]
    rows = [{"custom_id": p, "method": "POST", "url": CHAT,
             "body": {"model": "slow", "messages": [{"role": "user", "content": p}]}} for p in prompts]
    uploaded = client.files.create(file=("in.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in rows)),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    seen_progress: set[int] = set()
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
        assert batch.request_counts is not None
        seen_progress.add(batch.request_counts.completed)

    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (60, 0)
    assert batch.error_file_id is None
    out = [orjson.loads(x) for x in client.files.content(batch.output_file_id or "").text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == sorted(prompts)
    assert all(r["response"]["status_code"] == 200 for r in out)
    assert engine.calls == Counter(dict.fromkeys(prompts, 1)), "no request sent twice"
    assert engine.aborted == 0, "no request given up on"
    assert engine.longest_wait_s < 2.0, "no request waited inside the engine near the timeout"
    assert len(seen_progress - {0, 60}) >= 3, f"request_counts moved as answers landed: {sorted(seen_progress)}"


def test_the_limit_grows_while_answers_keep_their_pace_and_backs_off_when_they_slow() -> None:
    now = [0.0]
    limit = AdaptiveLimit(maximum=32, floor_s=60.0, initial=2, clock=lambda: now[0])

    async def answer(latency: float, n: int) -> None:
        for _ in range(n):
            await limit.acquire()
        now[0] += latency
        for _ in range(n):
            limit.release(latency, 9)

    async def scenario() -> list[int]:
        seen = [limit.current]
        for _ in range(4):  # same pace: slow start doubles the limit each round
            await answer(0.1, limit.current)
            seen.append(limit.current)
        await asyncio.sleep(0)
        await answer(0.5, limit.current)  # 5x slower per token: the upstream is saturated
        seen.append(limit.current)
        return seen

    seen = asyncio.run(scenario())
    assert seen[:5] == [2, 4, 8, 16, 32]
    assert seen[5] < 32
    assert limit.changes[-1].reason.startswith("time per token")
    assert limit.hung_after() == 60.0, "the floor, while 10x the slowest answer (5 s) is shorter"


def test_hung_after_is_measured_from_the_slowest_answer() -> None:
    now = [0.0]
    limit = AdaptiveLimit(maximum=4, floor_s=1.0, clock=lambda: now[0])

    async def one(latency: float) -> None:
        await limit.acquire()
        now[0] += latency
        limit.release(latency, 5)

    asyncio.run(one(0.05))
    assert limit.hung_after() == 1.0
    asyncio.run(one(3.0))
    assert limit.hung_after() == pytest.approx(30.0)


def test_the_upstream_queue_and_overload_answers_bring_the_limit_down() -> None:
    now = [0.0]
    limit = AdaptiveLimit(maximum=16, floor_s=60.0, initial=8, clock=lambda: now[0])

    async def scenario() -> None:
        limit.observe_queue(3)
        for _ in range(8):
            await limit.acquire()
        now[0] += 0.1
        for _ in range(8):
            limit.release(0.1, 9)
        assert limit.current < 8, "vLLM's num_requests_waiting > 0 is congestion"
        before = limit.current
        await limit.acquire()
        limit.release(None, congested=True)  # a 429 or 503
        assert limit.current < before or limit.current == 1

    asyncio.run(scenario())


def test_vllm_metrics_page_gives_the_waiting_requests() -> None:
    page = ('# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0\nvllm:num_requests_running{engine="0"} 4.0\n'
            'vllm:num_requests_waiting_by_reason{reason="x"} 9.0\n')
    assert parse_waiting(page) == 5
    assert parse_waiting("llamacpp:requests_processing 1\n") is None
