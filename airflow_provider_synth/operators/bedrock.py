"""Amazon Bedrock batch inference: OpenAI batch JSONL in, every answer landed in the output folder.

A :class:`~airflow_provider_synth.operators._base.SynthBatchOperator`: the lifecycle (defer or wait, rounds,
timeout and cancel, finish) is written there; here is what Bedrock adds: translating and staging the input in
S3 (:func:`~airflow_provider_synth.runs.bedrock.prepare`), the run
(:class:`~airflow_provider_synth.runs.bedrock.BedrockRun`) and its trigger. Its own knobs are
:class:`~airflow_provider_synth.runs.bedrock.BedrockBatchConfig`.

The module imports neither the amazon provider nor boto3: a DAG using the operator parses where the
``[bedrock]`` extra is not installed, and the task says which extra it needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow_provider_synth.batch.paths import as_path, join_path
from airflow_provider_synth.batch.requests import RequestTemplate
from airflow_provider_synth.batch.validate import InvalidRequests
from airflow_provider_synth.operators._base import DEFAULT_DEFERRABLE, RequestInput, SynthBatchOperator
from airflow_provider_synth.runs.bedrock import BedrockBatchConfig, BedrockPlan, BedrockRun, prepare
from airflow_provider_synth.triggers.bedrock import BedrockJobTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_synth.batch.checks import OutputChecks
    from airflow_provider_synth.runs.base import SynthRun

__all__ = ["DEFAULT_TIMEOUT", "BedrockBatchConfig", "BedrockBatchOperator"]

#: a Bedrock batch job may take up to its own timeout (24 h by default here); leave room for one retry round
DEFAULT_TIMEOUT = timedelta(hours=50)


def _hook(conn_id: str | None, region_name: str | None) -> Any:
    try:
        from airflow_provider_synth.hooks.bedrock import BedrockBatchHook
    except ImportError as exc:
        raise ImportError(f"BedrockBatchOperator needs the amazon provider and boto3 ({exc}): "
                          "pip install 'airflow-provider-synth[bedrock]'") from None
    return BedrockBatchHook(aws_conn_id=conn_id, region_name=region_name)


class BedrockBatchOperator(RequestInput, SynthBatchOperator):
    """Run OpenAI batch requests as Amazon Bedrock batch inference jobs and land every answer in the output
    folder: ``results.jsonl`` (input order), ``failures.jsonl`` and ``manifest.json`` (the return value).

    Each line is translated into the model family's native body (Claude, Llama, Mistral, Nova, Titan
    embeddings: see ``docs/operators/bedrock.md``); a line the family cannot take refuses the input (or, with
    ``invalid_requests="skip"``, becomes a failure row) before anything is staged. A run estimated over
    ``max_cost_usd`` is refused before anything is staged. The records are written to
    ``<config.staging_prefix>/<run key>/`` through the ``aws`` connection and split into as few jobs as
    Bedrock's limits allow. Every job is created with a ``clientRequestToken`` from the run key: a retried task
    re-attaches to its jobs, never creates a second one. A ``PartiallyCompleted`` job lands what succeeded;
    the records a retry can fix (throttled, 5xx, those of an expired job) run again in a follow-up job, up to
    ``retry_failed_requests`` rounds. Killed or timed out, the task stops its jobs.

    .. seealso:: :ref:`howto/operator:BedrockBatchOperator`

    :param conn_id: the amazon provider's ``aws`` connection (credentials, region, role assumption, endpoints).
    :param output_path: the output folder (local path, ``s3://``..., or ``ObjectStoragePath``), one per task
        instance (with ``{{ ti.map_index }}`` when mapped).
    :param input_path: an OpenAI batch JSONL file (local, URL or ``ObjectStoragePath``).
    :param requests: instead of ``input_path``: request lines, or records built with ``template`` and ``model``
        (for ``config.endpoint``), written to ``<output_path>/_work/requests.jsonl`` as on the other backends.
    :param template: how records become requests (:class:`~airflow_provider_synth.batch.requests.RequestTemplate`).
    :param model: the Bedrock model id, inference profile id (``us.anthropic.claude-...``) or ARN.
    :param retry_failed_requests: retry rounds (default 2) for the records a retry can fix (429, 5xx, an
        expired or stopped job's records, answers the output checks refused).
    :param max_cost_usd: refuse the run, before anything is staged, when its estimate at Bedrock's batch prices
        (``config.prices`` over the built-in table) is above this; the estimate is logged.
    :param poll_interval: seconds between status checks.
    :param timeout: the whole run's budget, counted from the first job's creation (a retry never extends it);
        at the deadline the jobs are stopped and the task fails.
    :param deferrable: wait in the triggerer instead of a worker slot (no cap of its own on the wait).
    :param max_failed_ratio: the largest share of failed requests the task accepts (0 = none).
    :param checks: output checks (:class:`~airflow_provider_synth.batch.checks.OutputChecks`).
    :param invalid_requests: ``"fail"`` (default) or ``"skip"`` (see the other batch operators).
    :param config: Bedrock's own knobs (:class:`~airflow_provider_synth.runs.bedrock.BedrockBatchConfig`):
        ``role_arn`` and ``staging_prefix`` (required; both stay templated as attributes of the operator),
        ``limits``, ``pad_to_minimum``, ``job_timeout_hours``, ``prices``, ``region_name``, ``cancel_on_kill``,
        ``max_active_jobs``, ``endpoint``. Given as keyword arguments (``role_arn=``, ``staging_prefix=``...)
        they still work, with a ``DeprecationWarning``.
    """

    template_fields: Sequence[str] = ("input_path", "output_path", "requests", "model", "role_arn",
                                      "staging_prefix")
    config_class = BedrockBatchConfig
    trigger_class = BedrockJobTrigger
    default_conn_id = "aws_default"
    default_timeout = DEFAULT_TIMEOUT
    collect_on_timeout = True
    priced = True
    ui_color = "#f7e4c6"
    config: BedrockBatchConfig

    def __init__(
        self,
        *,
        conn_id: str = "aws_default",
        output_path: Any = None,
        input_path: Any = None,
        requests: Any = None,
        template: RequestTemplate | None = None,
        model: str | None = None,
        retry_failed_requests: int | None = None,
        max_cost_usd: float | None = None,
        poll_interval: float = 60.0,
        timeout: timedelta | float = DEFAULT_TIMEOUT,
        deferrable: bool = DEFAULT_DEFERRABLE,
        max_failed_ratio: float = 0.0,
        checks: OutputChecks | None = None,
        invalid_requests: InvalidRequests = "fail",
        config: BedrockBatchConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id=conn_id, output_path=output_path, poll_interval=poll_interval, timeout=timeout,
                         deferrable=deferrable, max_failed_ratio=max_failed_ratio, checks=checks,
                         invalid_requests=invalid_requests, config=config, **kwargs)
        missing = [n for n, v in (("output_path", output_path), ("model", model),
                                  ("config.role_arn", self.config.role_arn),
                                  ("config.staging_prefix", self.config.staging_prefix)) if not v]
        if missing:
            raise ValueError(f"BedrockBatchOperator needs {', '.join(missing)}")
        self.take_input(input_path, requests, model, template)  # and checks' default: a schema the user wrote
        self.retry_failed_requests: int = self.argument_over_config("retry_failed_requests", retry_failed_requests)
        self.max_cost_usd = max_cost_usd

    # role_arn and staging_prefix live in the config; as attributes they stay templated fields
    @property
    def role_arn(self) -> str | None:
        return self.config.role_arn

    @role_arn.setter
    def role_arn(self, value: str | None) -> None:
        self.config = dataclasses.replace(self.config, role_arn=value)

    @property
    def staging_prefix(self) -> str | None:
        return self.config.staging_prefix

    @staging_prefix.setter
    def staging_prefix(self, value: str | None) -> None:
        self.config = dataclasses.replace(self.config, staging_prefix=value)

    @property
    def endpoint(self) -> str:
        """The endpoint of requests built from records (``config.endpoint``)."""
        return self.config.endpoint

    @endpoint.setter
    def endpoint(self, value: str) -> None:
        self.config = dataclasses.replace(self.config, endpoint=value)

    def output_folder(self) -> Any:
        return as_path(self.output_path)

    def _run_of(self, plan: BedrockPlan) -> BedrockRun:
        cfg = self.config
        run = BedrockRun(_hook(plan.conn_id, plan.region_name), plan, max_rounds=self.retry_failed_requests,
                         checks=self.checks, prices=cfg.prices, max_active_jobs=cfg.max_active_jobs,
                         max_cost_usd=self.max_cost_usd)
        run.attach()
        if run.jobs:
            self.log.info("found %d Bedrock job(s) of this run (key %s): %s", len(run.jobs), plan.key, run.states())
        self._run = run
        return run

    def _plan(self, context: Context) -> BedrockPlan:
        """Validate, translate, check the budget and stage the input, or find the plan an earlier try staged
        (same run key)."""
        source = self.request_source(join_path(as_path(self.output_path), "_work"), self.endpoint)
        _hook(self.conn_id, self.config.region_name)  # the extra's absence says so before any work
        ident = self.identity(context)
        cfg = self.config
        return prepare(source, key_parts=(ident.dag_id, ident.task_id, ident.run_id, ident.map_index),
                       model_id=str(self.model), role_arn=str(self.role_arn), staging_prefix=str(self.staging_prefix),
                       conn_id=self.conn_id, output_dir=self.output_path, region_name=cfg.region_name,
                       limits=cfg.limits, invalid_requests=self.invalid_requests, pad_to_minimum=cfg.pad_to_minimum,
                       checks=self.checks, timeout_hours=cfg.job_timeout_hours, name=str(source),
                       max_cost_usd=self.max_cost_usd, prices=cfg.prices)

    def start_run(self, context: Context) -> SynthRun:
        return self._run_of(self._plan(context))

    def defer_kwargs(self, run: SynthRun) -> dict[str, Any] | None:
        assert isinstance(run, BedrockRun)
        return {"staging": run.plan.staging}

    def resume_run(self, context: Context, event: Mapping[str, Any], kwargs: Mapping[str, Any]) -> SynthRun:
        # the plan's folder from the deferral; where it did not come back (dag.test() of Airflow 3.3 resumes
        # with the event alone), the input's run key finds the same plan again
        plan = BedrockPlan.load(str(kwargs["staging"])) if kwargs.get("staging") else None
        run = self._run_of(plan if plan is not None else self._plan(context))
        run.refresh(event[self.trigger_class.event_key])
        return run

    def trigger_conn_id(self, run: SynthRun) -> str:
        assert isinstance(run, BedrockRun)
        return run.plan.conn_id or self.conn_id

    def make_trigger(self, run: SynthRun, end_time: float) -> BaseTrigger:
        assert isinstance(run, BedrockRun)
        return BedrockJobTrigger(aws_conn_id=run.plan.conn_id, job_arns=run.running, region_name=run.plan.region_name,
                                 poll_interval=self.poll_interval_for(run), end_time=end_time,
                                 cancel_on_kill=self.cancel_on_kill)
