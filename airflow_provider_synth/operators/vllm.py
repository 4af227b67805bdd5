"""Offline batch inference with vLLM on the worker's own GPUs, same JSONL in and out as every backend.

vLLM cannot share Airflow's environment, so the engine runs in a subprocess of a separate interpreter
(``python``, :mod:`airflow_provider_synth.engine.vllm`), started, relayed and finished by the run
(:mod:`airflow_provider_synth.runs.vllm`). Nothing here imports vLLM or torch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow_provider_synth.batch.paths import as_path
from airflow_provider_synth.batch.validate import InvalidRequests
from airflow_provider_synth.operators._base import SynthBatchOperator
from airflow_provider_synth.runs.base import SynthRun
from airflow_provider_synth.runs.vllm import VLLMConfig, VLLMRun
from airflow_provider_synth.runs.vllm_workspace import merge_output_folders

if TYPE_CHECKING:
    import subprocess

    from airflow.providers.common.compat.sdk import Context
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_synth.batch.checks import OutputChecks

#: how long one try's engine may run by default (a week: the task's own bound is usually ``execution_timeout``)
DEFAULT_VLLM_TIMEOUT = timedelta(days=7)
#: VLLMEngineConfig fields the runner reads itself (never ``vllm.LLM`` keyword arguments)
_RUNNER_OPTIONS = ("served_model_names", "tool_call_parser", "enable_auto_tool_choice", "reasoning_parser")


@dataclass(frozen=True)
class VLLMEngineConfig:
    """Settings for ``vllm.LLM``. ``None`` leaves vLLM's default.

    :param tensor_parallel_size: GPUs one model replica spans (on one node).
    :param dtype: weights' dtype (``"auto"``, ``"bfloat16"``, ``"float16"``, ``"float32"``). ``"auto"`` on a CPU
        node is the dtype the CPU computes natively: bfloat16 only with AVX-512 BF16 / AMX, else float32
        (:func:`~airflow_provider_synth.engine.vllm.process.cpu_dtype`; the task log says which and why).
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


class VLLMBatchOperator(SynthBatchOperator):
    """Answer an OpenAI-format batch JSONL with a vLLM engine on this worker, and write the output folder.

    The input is validated first (every problem named by file, line and custom_id, before the engine starts).
    The engine runs in a subprocess of ``python`` (an interpreter with vLLM); it streams the requests in
    chunks and appends its answers to ``<output_path>/_vllm/engine-output.jsonl`` as it goes, so a retried
    task (or a new node) resumes where the last one stopped and never answers a request twice. At the end the
    answers are merged into ``results.jsonl`` (input order), ``failures.jsonl`` and ``manifest.json``
    (``backend: "vllm"``, usage totals), and the manifest is returned.

    Placement: send the task to GPU workers with ``queue=`` (CeleryExecutor) or
    ``executor_config=gpu_pod_override(...)`` (KubernetesExecutor); for data parallelism split the input with
    the core and ``.expand()`` this operator over the shards. The engine runs in the task, so the operator
    neither defers nor polls: ``timeout`` (or Airflow's ``execution_timeout``) stops the engine, keeping the
    answers it gave for the task's retry.

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
    :param timeout: how long one try's engine may run (``timedelta`` or seconds; default 7 days): at the
        deadline the engine is stopped, its answers kept, and the task fails with ``BatchTimeoutError``; a retry
        resumes from the saved answers.
    :param deferrable: ``False`` only: the engine runs in the task (nothing to defer to).
    :param max_failed_ratio: the share of failed requests tolerated before the task fails.
    :param checks: output checks (:class:`~airflow_provider_synth.batch.checks.OutputChecks`): answers cut off,
        refused or off-schema go to ``failures.jsonl`` with their text, never to results, unless a retry
        answers them (``config.check_retries``); the manifest counts them under ``checks``. Chat and
        completions only (embeddings, scores and reranks have nothing to check).
    :param invalid_requests: ``"fail"`` (default): an invalid line (bad JSON or fields, an unserved url or
        model, a duplicate id) refuses the input before the engine starts, naming every one. ``"skip"``: the
        engine answers the valid lines; each invalid one is a failure row in ``failures.jsonl`` (a 404 for a
        model the engine does not serve), counted in the manifest's ``invalid`` and against
        ``max_failed_ratio``. Requests the engine refuses at run time are error lines either way.
    :param config: the run's own knobs (:class:`~airflow_provider_synth.runs.vllm.VLLMConfig`): ``chunk_size``,
        ``env``, ``scratch_dir`` (was ``work_dir``), ``checkpoint_interval``, ``check_retries`` (was
        ``retry_failed_requests``). The old keyword arguments still work, with a ``DeprecationWarning``.
    """

    template_fields: Sequence[str] = ("input_path", "output_path", "model", "python")
    ui_color = "#fdb515"
    config_class = VLLMConfig
    trigger_class = type(None)  # the engine runs in the task: nothing to defer to
    default_conn_id = ""
    default_timeout = DEFAULT_VLLM_TIMEOUT
    renamed = {"work_dir": "scratch_dir", "retry_failed_requests": "check_retries"}
    config: VLLMConfig

    def __init__(
        self,
        *,
        input_path: Any,
        output_path: Any,
        model: str,
        engine: VLLMEngineConfig | None = None,
        sampling: Mapping[str, Any] | None = None,
        python: str = "python",
        timeout: timedelta | float = DEFAULT_VLLM_TIMEOUT,
        deferrable: bool = False,
        max_failed_ratio: float = 0.0,
        checks: OutputChecks | None = None,
        invalid_requests: InvalidRequests = "fail",
        config: VLLMConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if deferrable:
            raise ValueError("VLLMBatchOperator cannot defer: the engine runs in the task, on this worker's GPUs "
                             "(deferrable=False; bound it with timeout=)")
        super().__init__(output_path=output_path, timeout=timeout, deferrable=False, max_failed_ratio=max_failed_ratio,
                         checks=checks, invalid_requests=invalid_requests, config=config, **kwargs)
        self.input_path = input_path
        self.model = model
        self.engine = engine or VLLMEngineConfig()
        self.sampling = dict(sampling or {})
        self.python = python

    @property
    def _proc(self) -> subprocess.Popen[bytes] | None:
        """The engine's process while it runs."""
        run = self._run
        return run.proc if isinstance(run, VLLMRun) else None

    def start_run(self, context: Context) -> SynthRun:
        cfg = self.config
        run = VLLMRun(
            # paths with their connection: what the manifest and the engine state record reopens anywhere
            input_path=as_path(self.input_path), output_path=as_path(self.output_path), model=self.model,
            engine=self.engine,
            log=self.log, sampling=self.sampling, python=self.python, chunk_size=cfg.chunk_size, env=dict(cfg.env),
            checkpoint_interval=cfg.checkpoint_interval, checks=self.checks,
            retry_failed_requests=cfg.check_retries, invalid_requests=self.invalid_requests,
            scratch_dir=cfg.scratch_dir, deadline=time.time() + self.timeout_s,
        )
        self._run = run
        run.attach()
        return run

    def resume_run(self, context: Context, event: Mapping[str, Any], kwargs: Mapping[str, Any]) -> SynthRun:
        raise NotImplementedError("the vLLM operator never defers")

    def make_trigger(self, run: SynthRun, end_time: float) -> BaseTrigger:
        raise NotImplementedError("the vLLM operator never defers")


__all__ = ["VLLMBatchOperator", "VLLMConfig", "VLLMEngineConfig", "gpu_pod_override", "merge_output_folders"]
