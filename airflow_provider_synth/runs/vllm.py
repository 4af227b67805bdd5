"""One vLLM run, the operator's side of the process boundary: validate, start the engine, relay its events,
resume, finish. No Airflow context: :class:`~airflow_provider_synth.operators.vllm.VLLMBatchOperator` drives it.

vLLM cannot share Airflow's environment, so the engine runs in a subprocess of a separate interpreter
(``python -m airflow_provider_synth.engine.vllm``, :mod:`airflow_provider_synth.engine.vllm`). This module
starts it in its own process group with an allow-listed environment, relays its JSON progress events to the
task log, kills it (and whatever it left) on an error, a timeout or a kill, and merges its answers into the
output folder. The engine's answers are kept under ``<output_path>/_vllm/`` with a fingerprint of what they
depend on (:meth:`VLLMRun.fingerprint`), so a retried task on any node resumes instead of answering twice.
Nothing here imports vLLM or torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.jsonl import dumps, loads
from airflow_provider_synth.batch.keys import InputDigest, fingerprint
from airflow_provider_synth.batch.landing import landing
from airflow_provider_synth.batch.manifest import build_manifest, output_paths
from airflow_provider_synth.batch.merge import Accounting, ShardOutputs, merge_shards
from airflow_provider_synth.batch.paths import join_path, open_path
from airflow_provider_synth.batch.requests import VLLM_ENDPOINTS
from airflow_provider_synth.batch.split import ShardLimits, split_requests
from airflow_provider_synth.batch.validate import InvalidRequests, skipped_summary, validate_requests
from airflow_provider_synth.engine.vllm.process import engine_env, reclaim_output
from airflow_provider_synth.exceptions import BatchTimeoutError, VLLMEngineError
from airflow_provider_synth.runs.base import SynthRun
from airflow_provider_synth.runs.vllm_workspace import STATE_DIR, EngineWorkspace

#: how every progress event of the engine starts (``{"synth_vllm": "<event>", ...}``)
EVENT_PREFIX = b'{"synth_vllm":'
#: chat, completions, embeddings, score and rerank; a line naming another endpoint is invalid
SERVED_ENDPOINTS = VLLM_ENDPOINTS
#: One shard holding every valid line: the engine's input under ``invalid_requests="skip"``.
_ONE_SHARD = ShardLimits(max_requests=1 << 62, max_bytes=1 << 62, max_embedding_inputs=1 << 62)
#: the module the engine's interpreter runs
ENGINE_MODULE = "airflow_provider_synth.engine.vllm"


#: the one id a vLLM run "waits" for: its engine, which runs in the task's own process group
ENGINE_ID = "engine"


@dataclass(frozen=True)
class VLLMConfig:
    """The vLLM run's own knobs, beside the engine's settings (:class:`~airflow_provider_synth.operators.vllm.
    VLLMEngineConfig`), the sampling and the interpreter, which stay operator arguments.

    :param chunk_size: requests in the engine at once (embeddings, scores: per engine call), and the most
        answers held before they are written and synced (with at most a second's wait): what a kill can lose.
    :param env: environment variables for the engine process (``CUDA_VISIBLE_DEVICES``, ``HF_TOKEN``...),
        taken as given. Of the worker's own environment the engine inherits only what vLLM, CUDA, Hugging Face
        and the model need (see :mod:`airflow_provider_synth.engine.vllm.process`), never connections or
        secrets. Never logged.
    :param scratch_dir: local scratch folder for copies of remote input/output (default: a temporary folder;
        was ``work_dir``, which on the OpenAI operator names the run's remote work folder).
    :param checkpoint_interval: seconds between uploads of the engine's answers when ``output_path`` is
        remote, so that a lost node costs at most this much work.
    :param check_retries: how many times the running engine asks a request whose answer the output checks
        refused again at once, alone (with ``checks.retry_body`` for its kind); 0 reports them only (was
        ``retry_failed_requests``, which on the OpenAI operator counts retry rounds of batches). Failures of
        the engine itself (an aborted request) run again on a task retry.
    """

    chunk_size: int = 1024
    env: Mapping[str, str] = field(default_factory=dict)
    scratch_dir: str | None = None
    checkpoint_interval: float = 300.0
    check_retries: int = 2

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.check_retries < 0:
            raise ValueError(f"check_retries (retry_failed_requests) must be >= 0, got {self.check_retries}")


class EngineSettings(Protocol):
    """What a run needs of the engine's settings (:class:`~airflow_provider_synth.operators.vllm.
    VLLMEngineConfig`)."""

    @property
    def served_model_names(self) -> Sequence[str] | None: ...

    def llm_kwargs(self) -> dict[str, Any]: ...

    def served_names(self, model: str) -> list[str]: ...

    def runner_options(self) -> dict[str, Any]: ...


@dataclass
class Prepared:
    """A run ready to start: the validated input, the interpreter and the engine's workspace.

    :param python: the resolved vLLM interpreter.
    :param work: the engine's workspace (saved answers restored).
    :param engine_input: the engine's input (under ``"skip"``: a local file of the valid lines).
    :param invalid: the invalid lines' failure rows, ``None`` when there are none.
    :param endpoint: the requests' endpoint.
    """

    python: str
    work: EngineWorkspace
    engine_input: Any
    invalid: Any
    endpoint: str | None


@dataclass
class VLLMRun(SynthRun):
    """Drive one engine run: the :class:`SynthRun` of vLLM, whose work runs in this task's own process (no
    remote ids, nothing to poll): :meth:`attach` validates and restores the answers an earlier try saved,
    :meth:`submit` runs the engine to the end on what is still unanswered, :meth:`cancel` kills it. See
    :class:`~airflow_provider_synth.operators.vllm.VLLMBatchOperator` for the meaning of each setting.

    :param log: where progress and the engine's own lines go (the task's logger).
    """

    input_path: Any
    output_path: Any
    model: str
    engine: EngineSettings
    log: Any
    sampling: Mapping[str, Any] = field(default_factory=dict)
    python: str = "python"
    chunk_size: int = 1024
    env: Mapping[str, str] = field(default_factory=dict)
    checkpoint_interval: float = 300.0
    checks: OutputChecks | None = None
    retry_failed_requests: int = 2
    invalid_requests: InvalidRequests = "fail"
    scratch_dir: str | None = None
    #: when the engine is stopped (epoch seconds, the operator's ``timeout`` from this try's start; ``None``:
    #: never): the answers it gave are kept, and a retried task resumes from them
    deadline: float | None = None
    #: the engine's process while it runs
    proc: subprocess.Popen[bytes] | None = None
    #: set by :meth:`attach`
    prepared: Prepared | None = None
    elapsed: float = 0.0
    _scratch: tempfile.TemporaryDirectory[str] | None = None
    _done: bool = False

    backend = "vllm"

    # -- the run contract ----------------------------------------------------------------------------------

    @property
    def output_dir(self) -> Any:
        return self.output_path

    def attach(self) -> None:
        """Validate the input and restore the answers an earlier try saved for this very input, model and
        sampling (the engine then answers only what is still missing)."""
        if self.prepared is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="synth-vllm-", dir=self.scratch_dir)
            self.prepared = self.prepare(Path(self._scratch.name))

    def _ready(self) -> Prepared:
        if self.prepared is None:
            self.attach()
        assert self.prepared is not None
        return self.prepared

    def submit(self) -> list[str]:
        """Run the engine to the end (it answers what is not answered yet) and upload its answers."""
        if self._done:
            return []
        self.elapsed = self.answer(self._ready())
        self._done = True
        return [ENGINE_ID]

    def states(self) -> dict[str, str | None]:
        return {ENGINE_ID: "completed"} if self._done else {}

    def poll(self) -> list[tuple[str, BaseException]]:
        return []

    def is_transient(self, error: BaseException) -> bool:
        return False

    def cancel(self) -> list[str]:
        """Kill the engine if it runs."""
        running = self.proc is not None and self.proc.poll() is None
        self.kill()
        return [ENGINE_ID] if running else []

    def collect(self) -> Accounting:
        prepared = self._ready()
        paths = output_paths(self.output_path)
        with landing(paths["results_path"]) as results, landing(paths["failures_path"]) as failures:
            return merge_shards([ShardOutputs(requests=prepared.engine_input, outputs=[prepared.work.remote_output])],
                                results, failures, self.checks, invalid=prepared.invalid)

    def manifest(self, acct: Accounting | None, status: str, **fields: Any) -> dict[str, Any]:
        prepared, elapsed = self._ready(), self.elapsed
        return build_manifest(
            backend=self.backend, accounting=acct.as_dict() if acct is not None else {}, output_dir=self.output_path,
            status=status, model=self.model, endpoint=prepared.endpoint, batch_ids=[], cost_usd=None,
            engine_output_path=str(prepared.work.remote_output), engine=_public(self.engine.llm_kwargs()),
            elapsed_s=round(elapsed, 2),
            requests_per_s=round(acct.total / elapsed, 2) if acct is not None and elapsed > 0 else None, **fields,
        )

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch, self.prepared = None, None

    # -- the engine ----------------------------------------------------------------------------------------

    def prepare(self, scratch: Path) -> Prepared:
        """Validate the input (nothing starts before it passes), find the interpreter, and set up the
        workspace with the saved answers that were made for this very input, model and sampling."""
        engine_input, invalid, endpoint = self.screen(scratch)
        python = self.resolve_python()
        work = EngineWorkspace.create(engine_input, self.output_path, scratch)
        work.restore_state(self.fingerprint(), self.log)
        return Prepared(python, work, engine_input, invalid, endpoint)

    def answer(self, prepared: Prepared) -> float:
        """Run the engine to the end and upload its answers; return the seconds it took."""
        started = time.monotonic()
        try:
            self.run_engine(prepared.python, prepared.work)
        except BaseException:
            try:  # what the engine answered before it died is kept for the retry (a remote output folder)
                prepared.work.checkpoint()
            except Exception as exc:
                self.log.warning("could not save the engine's answers to %s: %s", prepared.work.remote_output, exc)
            raise
        prepared.work.checkpoint()
        return time.monotonic() - started

    def screen(self, scratch: Path) -> tuple[Any, Any, str | None]:
        """Validate the input against what the engine serves. Returns the engine's input, the invalid lines'
        failure rows (``None`` when there are none) and the requests' endpoint."""
        served = self.engine.served_names(self.model)
        invalid_path = join_path(join_path(self.output_path, STATE_DIR), "invalid.jsonl")
        if self.invalid_requests == "fail":
            summary = validate_requests(self.input_path, name=str(self.input_path), models=served,
                                        endpoints=SERVED_ENDPOINTS)
            endpoint, total, engine_input, invalid, synthetic = summary.endpoint, summary.total, self.input_path, 0, 0
        else:
            engine_input = scratch / "valid-requests.jsonl"
            split = split_requests(self.input_path, lambda _: open(engine_input, "wb"), limits=_ONE_SHARD,
                                   name=str(self.input_path), invalid_requests="skip", models=served,
                                   endpoints=SERVED_ENDPOINTS, open_rejected=lambda: open_path(invalid_path, "wb"))
            endpoint, total, invalid, synthetic = split.endpoint, split.total, split.invalid, split.synthetic_ids
        self.log.info("Validated %d %s requests in %s", total, endpoint, self.input_path)
        if invalid:
            self.log.warning(skipped_summary(invalid, synthetic, output_paths(self.output_path)["failures_path"]))
        return engine_input, invalid_path if invalid else None, endpoint

    def resolve_python(self) -> str:
        found = shutil.which(self.python) or (self.python if os.access(self.python, os.X_OK) else None)
        if found is None:
            raise VLLMEngineError(f"the vLLM interpreter {self.python!r} does not exist or is not executable; "
                                  "build one with scripts/install_vllm.sh and pass its bin/python as `python`")
        return found

    def fingerprint(self) -> str:
        """What the engine's saved answers depend on (:func:`~airflow_provider_synth.batch.keys.fingerprint`):
        the request lines, the model, the sampling and the engine settings that change the answers."""
        names = self.engine.served_model_names
        options = {k: v for k, v in self.engine.runner_options().items() if v}  # parsers change the answers
        digest = InputDigest()
        with open_path(self.input_path, "rb") as fp:
            for raw in fp:
                if raw.strip():
                    digest.line(raw.rstrip(b"\r\n"))
        return fingerprint(digest.hexdigest(), self.model, dict(self.sampling), self.engine.llm_kwargs(),
                           *([list(names)] if names else []), *([options] if options else []))

    def engine_config(self, work: EngineWorkspace) -> dict[str, Any]:
        """The engine's ``run.json`` (:class:`~airflow_provider_synth.engine.vllm.config.RunnerConfig`)."""
        served = self.engine.served_names(self.model)
        return {"input": str(work.local_input), "output": str(work.local_output), "model": self.model,
                "llm_kwargs": self.engine.llm_kwargs(), "sampling": dict(self.sampling),
                "chunk_size": self.chunk_size, "served_model_names": served,
                "served_model_name": served[0], **self.engine.runner_options(),
                # a pydantic model travels as its JSON schema: the engine's interpreter has no DAG code
                "checks": self.checks.to_spec() if self.checks is not None else None,
                "retry_failed_requests": self.retry_failed_requests}

    def run_engine(self, python: str, work: EngineWorkspace) -> None:
        """Start the engine, relay its events, checkpoint a remote output, and never leave it running."""
        config_path = work.scratch / "runner.json"
        config_path.write_bytes(dumps(self.engine_config(work)))
        cmd = [python, "-m", ENGINE_MODULE, "--config", str(config_path)]
        reclaim_output(work.local_output, self.log)  # a leftover engine of an earlier try: wait, then end it
        self.log.info("Starting the vLLM engine: %s (model %s)", " ".join(cmd), self.model)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=self.engine_env(work.scratch), start_new_session=True)
        relay = _Relay(self.log)
        last_checkpoint = time.monotonic()
        assert self.proc.stdout is not None
        expired = self._stop_at_deadline(self.proc)
        try:
            for line in self.proc.stdout:
                relay.line(line)
                if work.remote and time.monotonic() - last_checkpoint > self.checkpoint_interval:
                    work.checkpoint()
                    last_checkpoint = time.monotonic()
            rc = self.proc.wait()
        finally:
            if expired is not None:  # not fired yet: never; fired: wait until the engine's group is gone
                expired[1].cancel()
                expired[1].join(timeout=60)
            # execution_timeout or any error here: never leave an engine holding the GPU
            if self.proc.poll() is None:
                _kill_group(self.proc)
            else:
                _kill_leftovers(self.proc)
            self.proc = None
        if expired is not None and expired[0].is_set():
            assert self.deadline is not None
            raise BatchTimeoutError(
                f"timeout passed while the vLLM engine ran (deadline {time.strftime('%H:%M:%S', time.localtime(self.deadline))}): "
                f"it was stopped, and the answers it gave are kept in {work.remote_output}. Retry the task to "
                "answer the rest: it resumes and asks nothing twice (or give the task a longer timeout=).")
        if rc != 0 and relay.finished and relay.error is None:
            # every answer was fsynced before "done"; the merge still checks that each request has one
            self.log.warning("The vLLM engine exited with code %d after finishing its work; its output is kept",
                             rc)
        elif rc != 0:
            raise VLLMEngineError(relay.failure_message(rc))

    def _stop_at_deadline(self, proc: subprocess.Popen[bytes]) -> tuple[threading.Event, threading.Timer] | None:
        """At :attr:`deadline`, stop the engine's process group from a timer thread (the relay loop then sees
        the pipe close); returns ``(expired, timer)``, or ``None`` without a deadline."""
        if self.deadline is None:
            return None
        expired = threading.Event()

        def stop() -> None:
            if proc.poll() is None:
                expired.set()
                self.log.warning("The timeout passed while the vLLM engine ran: stopping it (pid %d); the answers it "
                                 "gave are kept", proc.pid)
                _kill_group(proc)

        timer = threading.Timer(max(0.0, self.deadline - time.time()), stop)
        timer.daemon = True
        timer.start()
        return expired, timer

    def engine_env(self, scratch: Path) -> dict[str, str]:
        """The engine's environment: an allow-list of the worker's, ``env``, and this provider's package (and
        nothing else of Airflow's) on its path."""
        shim = scratch / "pythonpath"
        shim.mkdir(exist_ok=True)
        package = Path(__file__).resolve().parents[1]
        (shim / package.name).symlink_to(package, target_is_directory=True)
        return engine_env(self.env, pythonpath=str(shim))

    def kill(self) -> None:
        """Stop the engine if it runs (the task was killed)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self.log.info("Stopping the vLLM engine (pid %d)", proc.pid)
            _kill_group(proc)


def _public(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Engine settings fit for XCom and logs: anything that looks like a credential is left out."""
    secret = ("token", "secret", "password", "api_key", "credential")
    return {k: v for k, v in kwargs.items() if not any(s in k.lower() for s in secret)}


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the engine's process group (vLLM starts engine-core children), then SIGKILL after ``grace``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_leftovers(proc: subprocess.Popen[bytes]) -> None:
    """After the runner exits, stop whatever of its process group is left (an engine-core child orphaned by a
    crash would hold the GPU)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Relay:
    """Relays the engine's output to the task log: progress events as one readable line each, vLLM's own
    log lines at debug level; keeps the last lines to explain a failure."""

    def __init__(self, log: Any, keep: int = 30) -> None:
        self.log = log
        self.tail: deque[str] = deque(maxlen=keep)
        self.error: dict[str, Any] | None = None
        self.finished = False

    def line(self, raw: bytes) -> None:
        if raw.startswith(EVENT_PREFIX):
            try:
                event = loads(raw)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.event(event)
                return
        text = raw.decode("utf-8", "replace").rstrip()
        if text:
            self.tail.append(text)
            self.log.debug("vllm: %s", text)

    def event(self, event: dict[str, Any]) -> None:
        kind = event.pop("synth_vllm", None)
        if kind == "progress":
            self.log.info("vLLM progress: %d/%d requests (%d failed), %.1f requests/s, %.0f tokens/s",
                          event["done"], event["total"], event["failed"], event["requests_per_s"],
                          event["tokens_per_s"])
        elif kind == "error":
            self.error = event
            self.log.error("vLLM engine: %s", event.get("message"))
        elif kind == "warning":
            self.log.warning("vLLM engine: %s", event.get("message"))
        else:
            self.finished = self.finished or kind == "done"
            self.log.info("vLLM %s: %s", kind, event)

    def failure_message(self, rc: int) -> str:
        if self.error is not None:
            head = f"the vLLM engine failed ({self.error.get('kind')}, exit code {rc}): {self.error.get('message')}"
        else:
            head = f"the vLLM engine exited with code {rc}"
        return head + "\nlast engine output:\n" + "\n".join(self.tail)
