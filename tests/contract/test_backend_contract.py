"""The backend contract, tested once for every backend's run (as the amazon provider tests every trigger's
serialization in one place): re-attach after a crash, retry of only what can succeed, cancel on timeout, the
accounting invariant, the manifest's keys, secrets absent; and the operators' and decorators' signatures.

Each backend is ONE entry of :data:`BACKENDS`: a function that starts its fake service (the real hook and SDK
over it) and returns a :class:`Backend`. Adding the next backend is adding its entry. A backend that answers in
the task's own process (vLLM: :attr:`Backend.in_process`) meets each rule in its own terms, in a branch of the
same test: a crash is resumed, not re-attached to, and its deadline is Airflow's ``execution_timeout``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_synth.exceptions import BatchTimeoutError
from airflow_provider_synth.operators._base import PRICED_ARGUMENTS, SHARED_ARGUMENTS, SynthBatchOperator
from airflow_provider_synth.runs.base import RunIdentity, SynthRun

N = 6
IDS = [f"r{i}" for i in range(N)]
#: fails once with an error a retry can fix, then succeeds
RETRYABLE = "r1"
#: fails for good (a retry would fail the same way): never sent twice
FATAL = "r2"


class FakeTI(SimpleNamespace):
    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def context(try_number: int = 1, run_id: str = "manual__1") -> dict[str, Any]:
    ti = FakeTI(dag_id="contract", task_id="t", run_id=run_id, map_index=-1, try_number=try_number, pushed={})
    return {"ti": ti}


@dataclass
class Backend:
    """One backend's run on its fake service, as the contract tests drive it.

    :param name: the manifest's ``backend``.
    :param operator: builds the backend's operator for the case's requests (keyword arguments: the shared
        ones, e.g. ``timeout``, ``max_failed_ratio``).
    :param sent: how many times the service was asked each custom_id so far.
    :param created: how many remote units (batches, statements; in process: engine runs) the service created so
        far.
    :param cancelled: the ids the service was asked to cancel (in process: the engine, once it was stopped
        before it finished and its process group is gone).
    :param slow: make the service take (much) longer than a test's deadline.
    :param secret: the connection's secret, which must appear nowhere (in process: an engine setting's, e.g. a
        Hugging Face token).
    :param rounds: the backend retries what can succeed inside one try, so one try sends RETRYABLE twice: in
        rounds of batches, or (vLLM) in its running engine, which asks an answer the output checks refused again
        at once (``VLLMConfig.check_retries``, the ``rounds`` keyword here). Otherwise only a task retry does.
    """

    name: str
    operator: Callable[..., SynthBatchOperator]
    sent: Callable[[], Counter[str]]
    created: Callable[[], int]
    cancelled: Callable[[], set[str]]
    slow: Callable[[], None]
    secret: str
    rounds: bool = True
    output: Path = field(default_factory=Path)
    #: what reached the service or its staging (uploads, staged objects, created batches): 0 before paying
    staged: Callable[[], int] = lambda: 0
    #: from now on every answer is prose where JSON was asked for (off any schema); a no-op where it already is
    off_schema: Callable[[], None] = lambda: None
    #: RETRYABLE fails once more, as it did the first time (a retry can fix it)
    fail_again: Callable[[], None] = lambda: None
    #: the run answers in the task's own process (vLLM's engine subprocess), not on a remote service:
    #: ``submit()`` runs it to the end, so there are no remote ids to re-attach to (a retried try resumes from the
    #: answers an earlier one saved), no trigger, and no deadline but Airflow's ``execution_timeout``
    in_process: bool = False
    #: in process: from now on the engine dies after this many answers (``None``: it lives)
    die_after: Callable[[int | None], None] = lambda n: None
    #: in process: the ids the saved answers settle for good (a fitting answer, a refusal): never asked again
    saved: Callable[[], set[str]] = lambda: set()

    def run(self, try_number: int = 1, run_id: str = "manual__1", **kwargs: Any) -> SynthRun:
        """The prepared (planned, re-attached) run of a task's try: a new object, as a retried task builds."""
        return self.operator(**kwargs).start_run(context(try_number, run_id))


# -- the backends ------------------------------------------------------------------------------------------------


def openai_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    from airflow_provider_synth.batch.requests import RequestTemplate
    from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator
    from airflow_provider_synth.runs.openai import OpenAIBatchConfig
    from airflow_provider_synth.server.config import Outcome, OutcomeRule

    secret = "sk-contract-SECRET-24680"
    rules = (OutcomeRule(RETRYABLE, Outcome.error(500), times=1), OutcomeRule(FATAL, Outcome.error(400)))
    server = request.getfixturevalue("batch_server_factory")(outcomes=rules)
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("AIRFLOW_CONN_CONTRACT_OPENAI", json.dumps(
        {"conn_type": "synth_openai", "password": secret, "host": server.base_url}))

    def count_sent() -> Counter[str]:  # every batch's input file, as the service holds it
        from airflow_provider_synth.hooks.openai import OpenAIBatchHook

        client, sent = OpenAIBatchHook("contract_openai").client, Counter[str]()
        for batch in server.batches():
            text = client.files.content(batch["input_file_id"]).text
            sent.update(json.loads(line)["custom_id"] for line in text.splitlines() if line.strip())
        return sent

    def operator(**kwargs: Any) -> SynthBatchOperator:
        kwargs.setdefault("output_path", str(tmp_path / "out"))
        return OpenAIBatchOperator(task_id="t", conn_id="contract_openai",
                                   requests=[{"id": i, "topic": i} for i in IDS], model="gpt-4o-mini",
                                   template=RequestTemplate(prompt_template="About {topic}", id_field="id"),
                                   retry_failed_requests=kwargs.pop("rounds", 2), poll_interval=0.05,
                                   deferrable=False, config=OpenAIBatchConfig(), **kwargs)

    return Backend(
        name="openai", operator=operator, sent=count_sent,
        created=lambda: server.counters["batches_created"],
        cancelled=lambda: {b["id"] for b in server.batches() if b.get("cancelling_at") or b.get("cancelled_at")},
        slow=lambda: server.configure(in_progress_s=60.0),
        secret=secret, output=tmp_path / "out",
        staged=lambda: server.counters["files_created"] + server.counters["batches_created"],
        off_schema=lambda: server.set_outcome("*", Outcome.success(content="Sure! Here is the answer.")),
        fail_again=lambda: server.set_outcome(RETRYABLE, Outcome.error(500), times=1),
    )


def bedrock_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The real boto3 client and the amazon provider's hook against the Bedrock stand-in over moto's S3."""
    import re

    from airflow_provider_synth.operators.bedrock import BedrockBatchOperator
    from airflow_provider_synth.runs.bedrock import BedrockBatchConfig
    from airflow_provider_synth.runs.bedrock_mapping import BedrockLimits
    from airflow_provider_synth.server.bedrock import BedrockStandIn, RecordFault

    bucket = request.getfixturevalue("s3_bucket")
    server = BedrockStandIn(bucket.endpoint_url, step_s=0.05, min_records=1).start()
    request.addfinalizer(server.close)
    server.record_faults = [RecordFault(f"About {RETRYABLE}<", 429, times=1),
                            RecordFault(f"About {FATAL}<", 400, times=None)]
    secret = "bedrock-contract-SECRET-13579"
    request.getfixturevalue("monkeypatch").setenv("AIRFLOW_CONN_CONTRACT_AWS", json.dumps(
        {"conn_type": "aws", "login": "AKIACONTRACT", "password": secret,
         "extra": {"region_name": "us-east-1", "endpoint_url": bucket.endpoint_url,
                   "service_config": {"bedrock": {"endpoint_url": server.endpoint_url}}}}))
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps({"custom_id": i, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "meta.llama3-1-8b-instruct-v1:0", "max_tokens": 16,
        "messages": [{"role": "user", "content": f"About {i}"}]}}) + "\n" for i in IDS))

    def count_sent() -> Counter[str]:  # every record the service processed, over every job
        sent = Counter[str]()
        for body, times in server.processed.items():
            found = re.search(r"About (r\d+)", body)
            if found:
                sent[found.group(1)] += times
        return sent

    def operator(**kwargs: Any) -> SynthBatchOperator:
        config = BedrockBatchConfig(role_arn="arn:aws:iam::123456789012:role/contract",
                                    staging_prefix=bucket.url("stage", conn=False),
                                    limits=BedrockLimits(min_records=1, max_records=100))
        kwargs.setdefault("output_path", str(tmp_path / "out"))
        return BedrockBatchOperator(task_id="t", conn_id="contract_aws", input_path=str(source),
                                    model="meta.llama3-1-8b-instruct-v1:0",
                                    retry_failed_requests=kwargs.pop("rounds", 2), poll_interval=0.05,
                                    deferrable=False, config=config, **kwargs)

    def slow() -> None:
        server.step_s = 60.0

    return Backend(
        name="bedrock", operator=operator, sent=count_sent, created=lambda: server.counters["jobs_created"],
        cancelled=lambda: {arn for arn, job in server.jobs.items() if job.stop_requested},
        slow=slow, secret=secret, output=tmp_path / "out",
        staged=lambda: len(bucket.keys("stage")) + server.counters["create_requests"],
        fail_again=lambda: server.record_faults.append(RecordFault(f"About {RETRYABLE}<", 429, times=1)),
    )


def anthropic_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    pytest.importorskip("anthropic")
    from airflow_provider_synth.batch.requests import RequestTemplate
    from airflow_provider_synth.operators.anthropic import AnthropicBatchOperator
    from airflow_provider_synth.server.config import Outcome, OutcomeRule

    secret = "sk-ant-contract-SECRET-13579"
    rules = (OutcomeRule(RETRYABLE, Outcome.error(529, code="overloaded_error"), times=1),
             OutcomeRule(FATAL, Outcome.error(400)))
    server = request.getfixturevalue("batch_server_factory")(outcomes=rules)
    request.getfixturevalue("monkeypatch").setenv("AIRFLOW_CONN_CONTRACT_ANTHROPIC", json.dumps(
        {"conn_type": "anthropic", "password": secret, "host": server.url}))

    def count_sent() -> Counter[str]:  # every message batch's requests, as the service holds them
        store, sent = server.app.store, Counter[str]()
        for batch in store.batches.values():
            with store.input_path(batch).open("rb") as fp:
                sent.update(json.loads(line)["custom_id"] for line in fp if line.strip())
        return sent

    def operator(**kwargs: Any) -> SynthBatchOperator:
        kwargs.setdefault("output_path", str(tmp_path / "out"))
        return AnthropicBatchOperator(task_id="t", conn_id="contract_anthropic",
                                      requests=[{"id": i, "topic": i} for i in IDS], model="claude-haiku-4-5",
                                      template=RequestTemplate(prompt_template="About {topic}", id_field="id"),
                                      retry_failed_requests=kwargs.pop("rounds", 2), poll_interval=0.05,
                                      deferrable=False, **kwargs)

    return Backend(
        name="anthropic", operator=operator, sent=count_sent,
        created=lambda: server.counters["message_batches_created"],
        cancelled=lambda: {b.id for b in server.app.store.batches.values() if b.api.get("cancelling_at")},
        slow=lambda: server.configure(in_progress_s=60.0, progress_steps=60),
        secret=secret, output=tmp_path / "out",
        staged=lambda: server.counters["message_batches_created"] + server.counters["http_requests_total"],
        off_schema=lambda: server.set_outcome("*", Outcome.success(content="Sure! Here is the answer.")),
        fail_again=lambda: server.set_outcome(RETRYABLE, Outcome.error(529, code="overloaded_error"), times=1),
    )


def cortex_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    from fakes.cortex import FakeCortex

    from airflow_provider_synth.operators.cortex import CortexBatchOperator, CortexConfig

    secret = "secret-pw-contract-97531"
    request.getfixturevalue("monkeypatch").setenv("AIRFLOW_CONN_CONTRACT_SNOWFLAKE", json.dumps(
        {"conn_type": "snowflake", "login": "u", "password": secret, "schema": "PUBLIC",
         "extra": {"account": "acct", "database": "SYNTH_DB", "warehouse": "WH"}}))
    # one row per statement: the statement of RETRYABLE dies once (its row rolls back: missing, answered by the
    # task's retry); FATAL's row gets a per-row Cortex error, which is final
    fake = FakeCortex(background=True, abort_after=1)
    fake.__enter__()
    request.addfinalizer(lambda: fake.__exit__(None, None, None))
    asked: Counter[str] = Counter()
    model_call = fake._call

    def counted(text: str) -> None:  # every model call, the aborted one included
        asked[text.split()[0]] += 1
        model_call(text)

    fake._call = counted  # type: ignore[method-assign]
    path = tmp_path / "requests.jsonl"
    with path.open("w") as fp:
        for i in IDS:
            body = {"model": "llama3.1-8b", "messages": [{"role": "user", "content": i + (" [fail]" if i == FATAL else "")}]}
            fp.write(json.dumps({"custom_id": i, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")

    def operator(**kwargs: Any) -> SynthBatchOperator:
        kwargs.pop("rounds", None)
        kwargs.setdefault("output_path", str(tmp_path / "out"))
        return CortexBatchOperator(task_id="t", conn_id="contract_snowflake", input_path=str(path),
                                   poll_interval=0.05, deferrable=False, config=CortexConfig(chunk_size=1), **kwargs)

    return Backend(
        name="cortex", operator=operator, sent=lambda: asked,
        created=lambda: len([q for q in fake.queries.values() if q.query_type == "INSERT" and "_RESULTS" in q.text]),
        cancelled=lambda: set(fake.cancelled), slow=fake.hold, secret=secret, rounds=False,
        output=tmp_path / "out",
    )


def vllm_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The real run and the real runner in a real engine subprocess, with the fake engine in place of
    ``vllm.LLM`` (:mod:`airflow_provider_synth.testing.vllm`, which records each request it is asked in
    ``SYNTH_FAKE_VLLM_ASKED``).

    FATAL is refused by the engine when it is added (``RAISE``, as vLLM refuses an over-long prompt): a final 400.
    RETRYABLE fails once and is answered when asked again: its first answer is off the schema and the running
    engine asks it again (``JSON <off> <fits>``). vLLM has no other failure that one try fixes (an aborted
    request waits for a task retry), so every vLLM case runs with ``OutputChecks(schema=SCHEMA)`` and every
    other answer is JSON that fits it.
    """
    from airflow_provider_synth.batch.checks import OutputChecks
    from airflow_provider_synth.operators.vllm import VLLMBatchOperator, VLLMConfig, VLLMEngineConfig
    from airflow_provider_synth.runs import vllm as vllm_run
    from airflow_provider_synth.testing.vllm import write_fake_python

    secret = "hf_contract_SECRET_86420"  # the engine loads the model with it: an engine setting, no connection
    python = write_fake_python(tmp_path / "vllm-python")
    asked, scratch, out = tmp_path / "asked.txt", tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()  # under tmp_path: a settings file the engine was handed, left behind, fails the secret test
    env = {"SYNTH_FAKE_VLLM_ASKED": str(asked)}
    prompts = {i: f'JSON {{"answer":"{i}"}}' for i in IDS}
    prompts[RETRYABLE] = f'JSON {{"answer":1}} {{"answer":"{RETRYABLE}"}}'
    prompts[FATAL] = f"RAISE {FATAL}"
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps({"custom_id": i, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "tiny", "max_tokens": 16, "messages": [{"role": "user", "content": prompts[i]}]}}) + "\n"
        for i in IDS))

    def count_sent() -> Counter[str]:  # every prompt added to an engine, over every engine process
        lines = asked.read_text().splitlines() if asked.exists() else []
        return Counter(m.group(1) for m in (re.search(r"\b(r\d+)\b", x) for x in lines) if m)

    monkeypatch = request.getfixturevalue("monkeypatch")
    members = request.getfixturevalue("group_members")
    starts: list[bool] = []
    stopped: set[str] = set()
    run_engine, kill_group = vllm_run.VLLMRun.run_engine, vllm_run._kill_group

    def counted_run(self: Any, python: str, work: Any) -> None:  # one engine run: what `created` counts
        try:
            run_engine(self, python, work)
        finally:  # whether it was handed the secret (else "appears nowhere" would prove nothing)
            settings = work.scratch / "runner.json"
            starts.append(settings.exists() and secret in settings.read_text())

    def watched_kill(proc: Any, grace: float = 10.0) -> None:  # the run stops an engine that still runs
        kill_group(proc, grace)
        with contextlib.suppress(Exception):
            proc.wait(timeout=15)
        deadline = time.monotonic() + 15
        while members(proc.pid) and time.monotonic() < deadline:  # the engine's whole group, its watchdog too
            time.sleep(0.05)
        if proc.poll() is not None and not members(proc.pid):
            stopped.add(vllm_run.ENGINE_ID)

    monkeypatch.setattr(vllm_run.VLLMRun, "run_engine", counted_run)
    monkeypatch.setattr(vllm_run, "_kill_group", watched_kill)
    request.addfinalizer(lambda: all(starts) or pytest.fail("an engine run was not handed the secret"))

    def operator(**kwargs: Any) -> SynthBatchOperator:
        kwargs.setdefault("output_path", str(out))
        kwargs.setdefault("checks", OutputChecks(schema=SCHEMA))
        config = VLLMConfig(env=dict(env), scratch_dir=str(scratch), check_retries=kwargs.pop("rounds", 2))
        return VLLMBatchOperator(task_id="t", input_path=str(source), model="tiny", python=python,
                                 engine=VLLMEngineConfig(extra={"hf_token": secret}), config=config, **kwargs)

    def die_after(answers: int | None) -> None:
        if answers is None:
            env.pop("SYNTH_FAKE_VLLM_DIE_AFTER", None)
        else:
            env["SYNTH_FAKE_VLLM_DIE_AFTER"] = str(answers)

    def saved() -> set[str]:  # the engine's saved answers that settle an id: one that fits SCHEMA, or a 4xx
        path, done = out / "_vllm" / "engine-output.jsonl", set()
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            status = (row.get("response") or {}).get("status_code") or 0
            if status == 200:
                content = row["response"]["body"]["choices"][0]["message"]["content"]
                with contextlib.suppress(ValueError, AttributeError):
                    if isinstance(json.loads(content).get("answer"), str):
                        done.add(row["custom_id"])
            elif 400 <= status < 500:
                done.add(row["custom_id"])
        return done

    return Backend(
        name="vllm", operator=operator, sent=count_sent, created=lambda: len(starts),
        cancelled=lambda: set(stopped), slow=lambda: env.update(SYNTH_FAKE_VLLM_DELAY="60"),
        secret=secret, output=out, in_process=True, die_after=die_after, saved=saved,
    )


#: every backend's entry: the next backend is one more line
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "openai": openai_backend,
    "anthropic": anthropic_backend,
    "bedrock": bedrock_backend,
    "cortex": cortex_backend,
    "vllm": vllm_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](request, tmp_path)


def drive(run: SynthRun) -> Any:
    """What the lifecycle does in a worker: round, submit, wait, until no round is left; then collect."""
    run.next_round()
    run.submit()
    while True:
        run.wait(0.05, time.time() + 120)
        if not run.next_round():
            return run.collect()
        run.submit()


def execution_timeout(op: SynthBatchOperator, seconds: float, ctx: dict[str, Any]) -> Any:
    """``op.execute(ctx)`` as Airflow's task runner bounds it with ``execution_timeout``: SIGALRM raises
    ``AirflowTaskTimeout`` in the task's main thread, then the runner calls ``on_kill``. The deadline of a run
    in the task's own process."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    def expire(signum: int, frame: Any) -> None:
        raise AirflowTaskTimeout(f"Timeout, PID: {os.getpid()}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return op.execute(ctx)
    except AirflowTaskTimeout:
        op.on_kill()
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


#: an execution_timeout well past the fake engine's start-up (a second or two on a busy machine) and far short of
#: one step of a slow engine (``Backend.slow``: 60 s)
ENGINE_DEADLINE_S = 5.0


# -- the contract ------------------------------------------------------------------------------------------------


def test_a_retried_try_reattaches_instead_of_submitting_again(backend: Backend) -> None:
    if backend.in_process:
        return _a_retried_try_resumes_and_asks_only_what_is_unanswered(backend)
    backend.slow()  # still running when the worker dies
    first = backend.run(1)
    first.next_round()
    assert first.submit()
    ids, created = set(first.states()), backend.created()
    # the worker dies here; the retry plans the same input again and finds what the first try submitted
    again = backend.run(2)
    assert set(again.states()) == ids
    again.next_round()
    assert again.submit() == [] and backend.created() == created


def _a_retried_try_resumes_and_asks_only_what_is_unanswered(backend: Backend) -> None:
    """In the task's own process a crash kills the engine with the try, and nothing runs on to re-attach to: the
    retried try restores the answers the first one saved and asks the engine only what is still unanswered."""
    backend.die_after(1)  # the engine dies mid-run, after its first answer
    first = backend.run(1)
    first.next_round()
    with pytest.raises(Exception, match="engine"):
        first.submit()
    saved, before = backend.saved(), backend.sent()
    assert FATAL in saved and 0 < len(saved) < N, saved  # mid-run; the refusal is saved (final)
    # every id was asked: those in the engine when it died were asked and lost, and are asked again
    assert set(before) == set(IDS) and backend.created() == 1
    backend.die_after(None)
    again = backend.run(2)
    again.next_round()
    assert again.submit() and backend.created() == 2
    asked = backend.sent() - before
    assert set(asked) == set(IDS) - saved, f"the retried try asked {dict(asked)}; saved before it: {saved}"
    acct = again.collect()
    assert (acct.succeeded, acct.failed, acct.missing, acct.total) == (N - 1, 1, 0, N)


def test_only_what_can_succeed_is_sent_again(backend: Backend) -> None:
    acct = drive(backend.run(1))
    if not backend.rounds:  # no rounds inside a try: the task's retry re-runs what can succeed
        acct = drive(backend.run(2))
    sent = backend.sent()
    assert sent[FATAL] == 1, "a request that fails for good was paid for twice"
    assert sent[RETRYABLE] == 2
    assert all(sent[i] == 1 for i in IDS if i not in (FATAL, RETRYABLE))
    assert (acct.succeeded, acct.failed, acct.missing, acct.total) == (N - 1, 1, 0, N)


def _priced(backend: Backend) -> None:
    if not type(backend.operator()).priced:  # type: ignore[attr-defined]
        pytest.skip(f"{backend.name} bills no tokens: no max_cost_usd, no paid retry rounds in a try")


def test_the_shared_arguments_warn_nothing_and_the_rounds_they_set_count(backend: Backend) -> None:
    _priced(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # shared arguments are first-class, not aliases
        op = backend.operator(rounds=0, max_cost_usd=1000.0)
    assert (op.retry_failed_requests, op.max_cost_usd) == (0, 1000.0)  # type: ignore[attr-defined]
    acct = drive(op.start_run(context(1)))
    sent = backend.sent()
    assert sent[RETRYABLE] == 1, "retry_failed_requests=0 still sent a retry round"
    assert (acct.succeeded, acct.failed) == (N - 2, 2)


def test_max_cost_usd_refuses_before_anything_is_uploaded_or_staged(backend: Backend) -> None:
    from airflow_provider_synth.exceptions import BudgetExceededError

    _priced(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        op = backend.operator(max_cost_usd=1e-9)
    with pytest.raises(BudgetExceededError, match=r"estimated cost \$[0-9.]+ .* is over max_cost_usd=\$1e-09"):
        op.start_run(context(1))
    assert backend.staged() == 0 and backend.created() == 0


#: what the contract's structured runs ask for: the fakes answer prose, off it (``Backend.off_schema``)
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def test_a_systematic_failure_is_not_retried_and_fails_the_task_saying_so(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every answer off the schema (a schema or prompt bug): not one of them is paid for again, the one
    request that failed for a reason a retry fixes is still retried, the answers land, the task fails with
    examples (issue 21's rule, on every backend with retry rounds)."""
    import airflow_provider_synth.batch.checks as checks_mod
    from airflow_provider_synth.batch.checks import OutputChecks
    from airflow_provider_synth.exceptions import BatchFailedError

    _priced(backend)
    monkeypatch.setattr(checks_mod, "SYSTEMATIC_MIN", 3)  # the share rule, on this case's 4 answers
    backend.off_schema()
    op = backend.operator(checks=OutputChecks(schema=SCHEMA), max_failed_ratio=1.0)
    with pytest.raises(BatchFailedError, match=r"systematic failure: 4 of 4 answers in round 0 were "
                                               r"schema_invalid \(examples: r\d: ") as err:
        op.execute(context())
    assert "retry_systematic=True" in str(err.value)
    sent = backend.sent()
    assert sent[RETRYABLE] == 2, "the request a retry can fix was not retried"
    assert all(sent[i] == 1 for i in IDS if i != RETRYABLE), f"an off-schema answer was paid for again: {sent}"
    failures = [json.loads(x) for x in (backend.output / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["custom_id"] for f in failures) == IDS  # every answer landed, as a failure

    # asked for: the same kind is retried (a new run, so nothing of the first is taken up)
    again = backend.run(1, run_id="manual__2", output_path=str(backend.output.parent / "again"),
                        checks=OutputChecks(schema=SCHEMA, retry_systematic=True), rounds=1)
    before = backend.sent()
    drive(again)
    assert backend.sent()["r0"] - before["r0"] == 2 and again.systematic_message() is None


def test_each_retry_round_is_estimated_against_the_budget_before_it_is_paid(
        backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    _priced(backend)
    caplog.set_level("INFO")
    first = backend.operator(max_cost_usd=1000.0).start_run(context(1))
    drive(first)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("retry round [1]:"))
    assert " 1 request(s) estimated at $" in line or " 1 record(s) estimated at $" in line, line
    assert "against max_cost_usd=$1000.0" in line
    assert backend.sent()[RETRYABLE] == 2
    # a budget round 0 fits in and its retry round does not: the retry is not paid for, it stays a failure
    est = first.plan.est_cost_usd  # type: ignore[attr-defined]  (every priced backend's plan keeps it)
    assert est and est > 0
    caplog.clear()
    backend.fail_again()
    before = backend.sent()
    acct = drive(backend.run(1, run_id="manual__2", output_path=str(backend.output.parent / "tight"),
                             max_cost_usd=est * 1.0001))
    assert backend.sent()[RETRYABLE] - before[RETRYABLE] == 1, "a retry round over the budget was submitted"
    assert "over max_cost_usd" in caplog.text and "not submitted" in caplog.text
    assert (acct.succeeded, acct.failed) == (N - 2, 2)


def test_the_deadline_cancels_what_still_runs(backend: Backend) -> None:
    backend.slow()
    if backend.in_process:  # submit() runs the engine: the shared timeout stops it, as execution_timeout does
        from airflow.sdk.exceptions import AirflowTaskTimeout

        with pytest.raises(BatchTimeoutError, match="it was stopped, and the answers it gave are kept"):
            backend.operator(timeout=ENGINE_DEADLINE_S).execute(context())
        assert backend.created() == 1 and backend.cancelled(), "the engine outlived the operator's timeout"
        with pytest.raises(AirflowTaskTimeout):
            execution_timeout(backend.operator(), ENGINE_DEADLINE_S, context(2))
        assert backend.created() == 2 and backend.cancelled(), "the engine outlived the task's execution_timeout"
        return
    with pytest.raises(BatchTimeoutError, match="cancelled") as err:
        backend.operator(timeout=1.0).execute(context())
    assert backend.cancelled() and backend.cancelled() <= set(str(err.value).split("'")[1::2])


def test_the_accounting_invariant_and_the_manifest(backend: Backend) -> None:
    manifest = backend.operator(max_failed_ratio=0.5).execute(context())
    results = [json.loads(x)["custom_id"] for x in (backend.output / "results.jsonl").read_text().splitlines()]
    failures = [json.loads(x)["custom_id"] for x in (backend.output / "failures.jsonl").read_text().splitlines()]
    assert sorted(results + failures) == sorted(IDS)  # every request exactly once
    assert manifest["succeeded"] + manifest["failed"] + manifest["missing"] == manifest["total"] == N
    assert MANIFEST_KEYS <= set(manifest), MANIFEST_KEYS - set(manifest)
    assert manifest["backend"].endswith(backend.name) or backend.name in manifest["backend"]
    assert json.loads((backend.output / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert {k: manifest[k] for k in ("dag_id", "task_id", "run_id", "map_index", "try_number")} == \
        RunIdentity.from_context(context()).manifest_fields()


def test_the_secret_appears_nowhere(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    op = backend.operator(max_failed_ratio=0.0)
    with pytest.raises(Exception) as err:  # over max_failed_ratio: the one exception, with its message
        op.execute(context())
    assert f"of {N} requests failed" in str(err.value)
    texts = [str(err.value)]
    backend.slow()  # another DAG run, still running: what its trigger would store
    other = str(backend.output.parent / "other")
    if backend.in_process:  # no trigger: a try killed mid-run leaves its engine's state in its output folder and
        # must leave nothing of the settings file that hands the engine the secret (both read below)
        from airflow.sdk.exceptions import AirflowTaskTimeout

        with pytest.raises(AirflowTaskTimeout) as timeout:
            execution_timeout(backend.operator(output_path=other), ENGINE_DEADLINE_S, context(run_id="manual__2"))
        assert backend.cancelled()
    else:
        run = backend.run(1, run_id="manual__2", output_path=other)
        run.next_round()
        run.submit()
        texts.append(json.dumps(op.make_trigger(run, time.time() + 60).serialize(), default=str))
        with pytest.raises(BatchTimeoutError) as timeout:
            backend.operator(timeout=0.5, output_path=other).execute(context(run_id="manual__2"))
    texts += [str(timeout.value), caplog.text]
    texts += [p.read_text() for p in backend.output.parent.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    assert len(texts) > 5 and not [t for t in texts if backend.secret in t]


#: the keys every backend's manifest has
MANIFEST_KEYS = {"manifest_version", "backend", "created_at", "output_dir", "results_path", "failures_path",
                 "manifest_path", "total", "succeeded", "failed", "missing", "error_codes", "usage", "cost_usd",
                 "model", "try_number", "dag_id", "task_id", "run_id", "map_index"}


# -- the signatures ---------------------------------------------------------------------------------------------


def _batch_operators() -> list[type[SynthBatchOperator]]:
    import airflow_provider_synth.operators.anthropic  # noqa: F401  (registers the subclasses)
    import airflow_provider_synth.operators.bedrock  # noqa: F401
    import airflow_provider_synth.operators.cortex  # noqa: F401
    import airflow_provider_synth.operators.openai_batch  # noqa: F401
    import airflow_provider_synth.operators.vllm  # noqa: F401

    found, todo = [], list(SynthBatchOperator.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_") and "Decorated" not in cls.__name__:
            found.append(cls)
    return found


def _parameters(cls: type) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD]


@pytest.mark.parametrize("cls", _batch_operators(), ids=lambda c: c.__name__)
def test_every_batch_operator_takes_at_most_15_parameters_with_the_shared_names(cls: type) -> None:
    params = _parameters(cls)
    assert len(params) <= 15, params
    assert not {"snowflake_conn_id", "chunk_size", "work_dir"} & set(params)  # one name per idea
    if "submitted" not in params:  # a results operator has its own short signature
        # an engine in the task's own process (vLLM) has no connection and nothing to poll
        shared = set(SHARED_ARGUMENTS) - ({"conn_id", "poll_interval"} if cls.trigger_class is type(None) else set())
        assert shared <= set(params), shared - set(params)
        if cls.priced:  # type: ignore[attr-defined]
            assert set(PRICED_ARGUMENTS) <= set(params), set(PRICED_ARGUMENTS) - set(params)


def test_every_priced_batch_service_takes_the_priced_arguments() -> None:
    """OpenAI/Azure, Anthropic and Bedrock take the same input, model, retry rounds and budget arguments."""
    priced = {c.__name__ for c in _batch_operators() if c.priced}
    assert {"OpenAIBatchOperator", "AnthropicBatchOperator", "BedrockBatchOperator"} <= priced, priced
    assert set(PRICED_ARGUMENTS) <= set(_parameters(next(c for c in _batch_operators()
                                                          if c.__name__ == "OpenAIBatchResultsOperator"))) | {
        "input_path", "requests", "template", "model"}


def _decorated_operators() -> list[type]:
    from airflow_provider_synth.decorators._base import SynthBatchDecoratedOperator
    from airflow_provider_synth.decorators.cortex import CortexBatchDecoratedOperator
    from airflow_provider_synth.decorators.openai_batch import OpenAIBatchDecoratedOperator
    from airflow_provider_synth.decorators.vllm import VLLMBatchDecoratedOperator

    found = [OpenAIBatchDecoratedOperator, CortexBatchDecoratedOperator, VLLMBatchDecoratedOperator]
    return [c for c in {*found, *SynthBatchDecoratedOperator.__subclasses__()} if not c.__name__.startswith("_")]


@pytest.mark.parametrize("cls", _decorated_operators(), ids=lambda c: c.__name__)
def test_every_batch_decorator_shares_one_base_and_takes_at_most_15_parameters(cls: type) -> None:
    from airflow_provider_synth.decorators._base import SynthBatchDecoratedOperator

    assert issubclass(cls, SynthBatchDecoratedOperator)
    operator = next(b for b in cls.__mro__[1:] if issubclass(b, SynthBatchOperator) and "Decorated" not in b.__name__)
    # what the function's return value replaces is no argument of the decorator
    own = set(_parameters(cls)) | {"op_args", "op_kwargs"}
    params = own | set(_parameters(operator)) - {"input_path", "requests", "source_table"}
    assert len(params - {"op_args", "op_kwargs"}) <= 15, sorted(params)
    module = inspect.getsource(inspect.getmodule(cls))  # type: ignore[arg-type]
    assert "operators.openai_batch import RequestTemplate" not in module
