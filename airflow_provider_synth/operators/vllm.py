"""Offline batch inference with vLLM on the worker's own GPUs, same JSONL in and out as every backend.

vLLM cannot share Airflow's environment, so the engine runs in a subprocess of a separate interpreter
(``python``), driven by :mod:`airflow_provider_synth.runs.vllm_runner`. Nothing here imports vLLM or torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.jsonl import dumps, join_path, loads, open_path
from airflow_provider_synth.batch.landing import landing
from airflow_provider_synth.batch.manifest import build_manifest, output_paths, write_manifest
from airflow_provider_synth.batch.merge import ShardOutputs, merge_shards
from airflow_provider_synth.batch.requests import VLLM_ENDPOINTS
from airflow_provider_synth.batch.split import ShardLimits, split_requests
from airflow_provider_synth.batch.validate import (
    InvalidRequests,
    check_invalid_requests,
    skipped_summary,
    validate_requests,
)
from airflow_provider_synth.exceptions import BatchFailedError, VLLMEngineError
from airflow_provider_synth.operators._native import ManifestPublisherMixin, OutputClaimMixin
from airflow_provider_synth.runs.vllm_process import engine_env, reclaim_output
from airflow_provider_synth.runs.vllm_workspace import STATE_DIR, EngineWorkspace, merge_output_folders

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

EVENT_PREFIX = b'{"synth_vllm":'
#: chat, completions, embeddings, score and rerank; a line naming another endpoint is invalid
SERVED_ENDPOINTS = VLLM_ENDPOINTS
#: One shard holding every valid line: the engine's input under ``invalid_requests="skip"``.
#: VLLMEngineConfig fields the runner reads itself (never ``vllm.LLM`` keyword arguments)
_RUNNER_OPTIONS = ("served_model_names", "tool_call_parser", "enable_auto_tool_choice", "reasoning_parser")
_ONE_SHARD = ShardLimits(max_requests=1 << 62, max_bytes=1 << 62, max_embedding_inputs=1 << 62)


@dataclass(frozen=True)
class VLLMEngineConfig:
    """Settings for ``vllm.LLM``. ``None`` leaves vLLM's default.

    :param tensor_parallel_size: GPUs one model replica spans (on one node).
    :param dtype: weights' dtype (``"auto"``, ``"bfloat16"``, ``"float16"``, ``"float32"``).
    :param max_model_len: context length; lower it to fit the KV cache on a small GPU.
    :param gpu_memory_utilization: share of GPU memory vLLM may take (on CPU: of RAM).
    :param enforce_eager: skip CUDA graphs / torch.compile (faster start-up, slower decoding).
    :param seed: the engine's random seed.
    :param extra: anything else ``vllm.LLM`` takes (``quantization``, ``kv_cache_memory_bytes``, ``runner``...).
    :param served_model_names: the names a request line's ``model`` may use for this engine (the first is
        written in the answers), as ``--served-model-name`` does for vLLM's server; default: the operator's
        ``model``. A line naming another model is invalid. Use it for files that name the hub id.
    :param tool_call_parser: vLLM's tool parser (``"hermes"``, ``"llama3_json"``, ``"pythonic"``...) that turns
        answers into ``message.tool_calls``, as ``run_batch --tool-call-parser``; needed for ``tool_choice``
        "required" or a named function.
    :param enable_auto_tool_choice: parse tool calls for ``tool_choice: "auto"`` (``--enable-auto-tool-choice``).
    :param reasoning_parser: vLLM's reasoning parser (``"deepseek_r1"``, ``"qwen3"``...) that moves the
        reasoning into ``message.reasoning`` (``--reasoning-parser``).
    """

    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    seed: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    served_model_names: Sequence[str] | None = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` (JSON-serializable; the runner receives them in a file)."""
        kwargs = {k: v for k, v in asdict(self).items()
                  if k not in ("extra", *_RUNNER_OPTIONS) and v is not None}
        kwargs.update(self.extra)
        return kwargs

    def served_names(self, model: str) -> list[str]:
        """The model names request lines may use: ``served_model_names``, else vLLM's own
        ``served_model_name`` engine argument (in ``extra``), else ``model``."""
        engine_names = self.extra.get("served_model_name")
        if self.served_model_names:
            return list(self.served_model_names)
        if engine_names:
            return [engine_names] if isinstance(engine_names, str) else list(engine_names)
        return [model]

    def runner_options(self) -> dict[str, Any]:
        """What the runner itself does with the answers (vLLM's OpenAI parsers), not ``vllm.LLM`` settings."""
        return {"tool_call_parser": self.tool_call_parser, "enable_auto_tool_choice": self.enable_auto_tool_choice,
                "reasoning_parser": self.reasoning_parser}


def gpu_pod_override(gpus: int = 1, *, image: str | None = None, memory: str | None = None,
                     node_selector: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An ``executor_config`` for the KubernetesExecutor: run the task in a pod that asks for ``gpus``
    ``nvidia.com/gpu``. Needs the ``kubernetes`` client (installed with the cncf.kubernetes provider).

    :param gpus: GPUs the pod requests and is limited to.
    :param image: a worker image with both Airflow and the vLLM interpreter (default: the executor's).
    :param memory: a memory request and limit, e.g. ``"64Gi"``.
    :param node_selector: labels of the GPU node pool.
    """
    from kubernetes.client import models as k8s

    limits = {"nvidia.com/gpu": str(gpus), **({"memory": memory} if memory else {})}
    container = k8s.V1Container(name="base", image=image,
                                resources=k8s.V1ResourceRequirements(requests=limits, limits=limits))
    spec = k8s.V1PodSpec(containers=[container], node_selector=dict(node_selector) if node_selector else None)
    return {"pod_override": k8s.V1Pod(spec=spec)}


class VLLMBatchOperator(OutputClaimMixin, ManifestPublisherMixin, BaseOperator):
    """Answer an OpenAI-format batch JSONL with a vLLM engine on this worker, and write the output folder.

    The input is validated first (every problem named by file, line and custom_id, before the engine starts).
    The engine runs in a subprocess of ``python`` (an interpreter with vLLM); it streams the requests in
    chunks and appends its answers to ``<output_path>/_vllm/engine-output.jsonl`` as it goes, so a retried
    task (or a new node) resumes where the last one stopped and never answers a request twice. At the end the
    answers are merged into ``results.jsonl`` (input order), ``failures.jsonl`` and ``manifest.json``
    (``backend: "vllm"``, usage totals), and the manifest is returned.

    Placement: send the task to GPU workers with ``queue=`` (CeleryExecutor) or
    ``executor_config=gpu_pod_override(...)`` (KubernetesExecutor); for data parallelism split the input with
    the core and ``.expand()`` this operator over the shards.

    .. seealso::
        :ref:`howto/operator:VLLMBatchOperator`

    :param input_path: the request JSONL (local path, URL or ObjectStoragePath); chat completions,
        completions or embeddings.
    :param output_path: the output folder (local path, URL or ObjectStoragePath), one per task instance (with
        ``{{ ti.map_index }}`` when mapped: see :mod:`~airflow_provider_synth.batch.claims`).
    :param model: a local path or model id the worker can load (weights are never downloaded by the tests).
    :param engine: ``vllm.LLM`` settings (:class:`VLLMEngineConfig`).
    :param sampling: default sampling parameters in vLLM's names (``max_tokens``, ``temperature``...); each
        request's body overrides them. Without ``max_tokens`` a request may generate up to the context length,
        as in the OpenAI API.
    :param python: the interpreter that has vLLM (vLLM cannot share Airflow's environment).
    :param chunk_size: requests in the engine at once (embeddings, scores: per engine call), and the most
        answers held before they are written and synced (with at most a second's wait): what a kill can lose.
    :param env: environment variables for the engine process (``CUDA_VISIBLE_DEVICES``, ``HF_TOKEN``...),
        taken as given. Of the worker's own environment the engine inherits only what vLLM, CUDA, Hugging Face
        and the model need (see :mod:`airflow_provider_synth.runs.vllm_process`), never connections or
        secrets. Never logged.
    :param work_dir: local scratch folder for copies of remote input/output (default: a temporary folder).
    :param max_failed_ratio: the share of failed requests tolerated before the task fails.
    :param checkpoint_interval: seconds between uploads of the engine's answers when ``output_path`` is
        remote, so that a lost node costs at most this much work.
    :param checks: output checks (:class:`~airflow_provider_synth.batch.checks.OutputChecks`): answers cut off,
        refused or off-schema go to ``failures.jsonl`` with their text, never to results, unless a retry
        answers them; the manifest counts them under ``checks``. Chat and completions only (embeddings, scores
        and reranks have nothing to check).
    :param retry_failed_requests: retry rounds for unusable answers (``checks``): the running engine asks such
        a request again at once, alone (with ``checks.retry_body`` for its kind), up to this many times; 0
        reports them only. Failures of the engine itself (an aborted request) run again on a task retry.
    :param invalid_requests: ``"fail"`` (default): an invalid line (bad JSON or fields, an unserved url or
        model, a duplicate id) refuses the input before the engine starts, naming every one. ``"skip"``: the
        engine answers the valid lines; each invalid one is a failure row in ``failures.jsonl`` (a 404 for a
        model the engine does not serve), counted in the manifest's ``invalid`` and against
        ``max_failed_ratio``. Requests the engine refuses at run time are error lines either way.
    """

    template_fields: Sequence[str] = ("input_path", "output_path", "model", "python")
    ui_color = "#fdb515"

    def __init__(
        self,
        *,
        input_path: Any,
        output_path: Any,
        model: str,
        engine: VLLMEngineConfig | None = None,
        sampling: Mapping[str, Any] | None = None,
        python: str = "python",
        chunk_size: int = 1024,
        env: Mapping[str, str] | None = None,
        work_dir: str | None = None,
        max_failed_ratio: float = 0.0,
        checkpoint_interval: float = 300.0,
        checks: OutputChecks | None = None,
        retry_failed_requests: int = 2,
        invalid_requests: InvalidRequests = "fail",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if retry_failed_requests < 0:
            raise ValueError(f"retry_failed_requests must be >= 0, got {retry_failed_requests}")
        if not 0.0 <= max_failed_ratio <= 1.0:
            raise ValueError(f"max_failed_ratio must be between 0 and 1, got {max_failed_ratio}")
        self.input_path = input_path
        self.output_path = output_path
        self.model = model
        self.engine = engine or VLLMEngineConfig()
        self.sampling = dict(sampling or {})
        self.python = python
        self.chunk_size = chunk_size
        self.env = dict(env or {})
        self.work_dir = work_dir
        self.max_failed_ratio = max_failed_ratio
        self.checkpoint_interval = checkpoint_interval
        if checks is not None and checks.direct_tail:
            raise ValueError("checks.direct_tail is for the OpenAI and Azure Batch API only")
        self.checks = checks
        self.retry_failed_requests = retry_failed_requests
        self.invalid_requests = check_invalid_requests(invalid_requests)
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------------------------------------ execute

    def execute(self, context: Context) -> dict[str, Any]:
        self.claim_output(context)
        with tempfile.TemporaryDirectory(prefix="synth-vllm-", dir=self.work_dir) as scratch:
            engine_input, invalid, endpoint = self._screen(Path(scratch))
            python = self._resolve_python()
            work = EngineWorkspace.create(engine_input, self.output_path, Path(scratch))
            work.restore_state(self._fingerprint(), self.log)
            started = time.monotonic()
            self._run_engine(python, work)
            work.checkpoint()
            elapsed = time.monotonic() - started
            return self._finish(context, work, elapsed, engine_input, invalid, endpoint)

    def _screen(self, scratch: Path) -> tuple[Any, Any, str | None]:
        """Validate the input against what the engine serves (nothing runs before this passes). Returns the
        engine's input (under ``"skip"``: a local file of the valid lines), the invalid lines' failure rows
        (``None`` when there are none) and the requests' endpoint."""
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

    def _resolve_python(self) -> str:
        found = shutil.which(self.python) or (self.python if os.access(self.python, os.X_OK) else None)
        if found is None:
            raise VLLMEngineError(f"the vLLM interpreter {self.python!r} does not exist or is not executable; "
                                  "build one with scripts/install_vllm.sh and pass its bin/python as `python`")
        return found

    def _fingerprint(self) -> str:
        """What the engine's saved answers depend on: the input's bytes, the model and the sampling."""
        names = self.engine.served_model_names
        options = {k: v for k, v in self.engine.runner_options().items() if v}  # parsers change the answers
        digest = hashlib.sha256(dumps([self.model, self.sampling, self.engine.llm_kwargs(),
                                       *([list(names)] if names else []), *([options] if options else [])]))
        with open_path(self.input_path, "rb") as fp:
            for block in iter(lambda: fp.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def _run_engine(self, python: str, work: EngineWorkspace) -> None:
        served = self.engine.served_names(self.model)
        config = {"input": str(work.local_input), "output": str(work.local_output), "model": self.model,
                  "llm_kwargs": self.engine.llm_kwargs(), "sampling": self.sampling,
                  "chunk_size": self.chunk_size, "served_model_names": served,
                  "served_model_name": served[0], **self.engine.runner_options(),
                  # a pydantic model travels as its JSON schema: the engine's interpreter has no DAG code
                  "checks": self.checks.to_spec() if self.checks is not None else None,
                  "retry_failed_requests": self.retry_failed_requests}
        config_path = work.scratch / "runner.json"
        config_path.write_bytes(dumps(config))
        cmd = [python, "-m", "airflow_provider_synth.runs.vllm_runner", "--config", str(config_path)]
        reclaim_output(work.local_output, self.log)  # a leftover engine of an earlier try: wait, then end it
        self.log.info("Starting the vLLM engine: %s (model %s)", " ".join(cmd), self.model)
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=self._runner_env(work.scratch), start_new_session=True)
        relay = _Relay(self.log)
        last_checkpoint = time.monotonic()
        assert self._proc.stdout is not None
        try:
            for line in self._proc.stdout:
                relay.line(line)
                if work.remote and time.monotonic() - last_checkpoint > self.checkpoint_interval:
                    work.checkpoint()
                    last_checkpoint = time.monotonic()
            rc = self._proc.wait()
        finally:
            # execution_timeout or any error here: never leave an engine holding the GPU
            if self._proc.poll() is None:
                _kill_group(self._proc)
            else:
                _kill_leftovers(self._proc)
            self._proc = None
        if rc != 0 and relay.finished and relay.error is None:
            # every answer was fsynced before "done"; the merge below still checks that each request has one
            self.log.warning("The vLLM engine exited with code %d after finishing its work; its output is kept",
                             rc)
        elif rc != 0:
            raise VLLMEngineError(relay.failure_message(rc))

    def _runner_env(self, scratch: Path) -> dict[str, str]:
        """The engine's environment: an allow-list of the worker's, ``env``, and this provider's package (and
        nothing else of Airflow's) on its path."""
        shim = scratch / "pythonpath"
        shim.mkdir(exist_ok=True)
        package = Path(__file__).resolve().parents[1]
        (shim / package.name).symlink_to(package, target_is_directory=True)
        return engine_env(self.env, pythonpath=str(shim))

    def _finish(self, context: Context, work: EngineWorkspace, elapsed: float, requests: Any,
                invalid: Any, endpoint: str | None) -> dict[str, Any]:
        paths = output_paths(self.output_path)
        with landing(paths["results_path"]) as results, landing(paths["failures_path"]) as failures:
            acct = merge_shards([ShardOutputs(requests=requests, outputs=[work.remote_output])],
                                results, failures, self.checks, invalid=invalid)
        ti = context["ti"]
        manifest = build_manifest(
            backend="vllm", accounting=acct.as_dict(), output_dir=self.output_path, model=self.model,
            endpoint=endpoint, batch_ids=[], cost_usd=None, engine_output_path=str(work.remote_output),
            engine=_public(self.engine.llm_kwargs()), elapsed_s=round(elapsed, 2),
            requests_per_s=round(acct.total / elapsed, 2) if elapsed > 0 else None,
            try_number=ti.try_number, dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
            map_index=ti.map_index,
        )
        write_manifest(self.output_path, manifest)
        self.publish_manifest(context, manifest)
        self.log.info("vLLM batch: %d succeeded, %d failed, %d missing of %d; usage %s", acct.succeeded,
                      acct.failed, acct.missing, acct.total, manifest["usage"])
        failed_ratio = (acct.failed + acct.missing) / acct.total if acct.total else 0.0
        if failed_ratio > self.max_failed_ratio:
            raise BatchFailedError(
                f"{acct.failed + acct.missing} of {acct.total} requests failed ({failed_ratio:.1%} > "
                f"max_failed_ratio {self.max_failed_ratio:.1%}); see {paths['failures_path']}"
            )
        return manifest

    def on_kill(self) -> None:
        proc = self._proc
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


__all__ = ["VLLMBatchOperator", "VLLMEngineConfig", "gpu_pod_override", "merge_output_folders"]
