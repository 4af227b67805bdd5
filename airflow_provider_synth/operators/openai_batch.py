"""Operators for the OpenAI and Azure OpenAI Batch API: records in, every answer landed in object storage.

Both are :class:`~airflow_provider_synth.operators._base.SynthBatchOperator` s: the lifecycle (defer or wait,
rounds, timeout and cancel, finish) is written there; here is what the Batch API adds: planning the input into
shards, the run (:class:`~airflow_provider_synth.runs.openai.BatchRun`), its trigger and console links. Its
own knobs are :class:`~airflow_provider_synth.runs.openai.OpenAIBatchConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow_provider_synth.batch.paths import as_path, join_path, open_path
from airflow_provider_synth.batch.requests import (
    AZURE_ENDPOINTS,
    OPENAI_ENDPOINTS,
    Endpoint,
    RequestTemplate,
)
from airflow_provider_synth.batch.split import split_requests
from airflow_provider_synth.batch.usage import check_budget, estimate_cost
from airflow_provider_synth.batch.validate import InvalidRequests, skipped_summary
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.links import OpenAIBatchLink
from airflow_provider_synth.operators._base import (
    DEFAULT_DEFERRABLE,
    PromptRecords,
    RequestInput,
    SynthBatchOperator,
)
from airflow_provider_synth.runs.base import SynthRun
from airflow_provider_synth.runs.openai import (
    DEFAULT_EXPIRES_AFTER,
    INVALID_FILE,
    BatchRun,
    OpenAIBatchConfig,
    Plan,
)
from airflow_provider_synth.triggers.openai_batch import OpenAIBatchTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_synth.batch.checks import OutputChecks

__all__ = ["DEFAULT_EXPIRES_AFTER", "DEFAULT_TIMEOUT", "OpenAIBatchConfig", "OpenAIBatchOperator",
           "OpenAIBatchResultsOperator", "PromptRecords", "RequestTemplate"]

#: the Batch API's window is 24 h; leave room for finalizing and one retry round
DEFAULT_TIMEOUT = timedelta(hours=26)


class _OpenAIBatchLifecycle(SynthBatchOperator):
    """What both OpenAI operators add to the lifecycle: the Batch API's run, trigger and links."""

    config_class = OpenAIBatchConfig
    trigger_class = OpenAIBatchTrigger
    default_conn_id = OpenAIBatchHook.default_conn_name
    default_timeout = DEFAULT_TIMEOUT
    direct_tail = True
    operator_extra_links = (OpenAIBatchLink(),)
    ui_color = "#d7f0e6"
    config: OpenAIBatchConfig

    @property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(self.conn_id)

    def _work_dir(self) -> Any:
        """Where the plan of this task's run lives (the resumed task instance is a new object)."""
        return join_path(as_path(self.output_path), "_work")

    def attach(self, plan: Plan) -> BatchRun:
        run = BatchRun(OpenAIBatchHook(plan.conn_id), plan, as_path, self.checks, self.config)
        run.attach()
        if run.batches:
            self.log.info("found %d batch(es) of this run (key %s): %s", len(run.batches), plan.key, run.statuses())
        self._run = run
        return run

    def resume_run(self, context: Context, event: Mapping[str, Any], kwargs: Mapping[str, Any]) -> SynthRun:
        run = self.attach(Plan.load(self._work_dir()))
        run.refresh(event["batches"])
        return run

    def make_trigger(self, run: SynthRun, end_time: float) -> BaseTrigger:
        assert isinstance(run, BatchRun)
        return OpenAIBatchTrigger(conn_id=run.plan.conn_id, batch_ids=run.running_ids,
                                  poll_interval=self.poll_interval_for(run), end_time=end_time,
                                  cancel_on_kill=self.cancel_on_kill)

    def trigger_conn_id(self, run: SynthRun) -> str:
        assert isinstance(run, BatchRun)
        return run.plan.conn_id

    def default_poll_interval_for(self, run: SynthRun) -> float:
        """60 s against a service, 2 s against a server on this machine (see the hook's rule)."""
        assert isinstance(run, BatchRun)
        return run.hook.default_poll_interval

    def persist_links(self, context: Context, run: SynthRun) -> None:
        """Store the dashboard link before deferring, so it works while the task waits."""
        assert isinstance(run, BatchRun)
        if run.batch_ids:
            azure = run.hook.is_azure
            OpenAIBatchLink.persist(context, run.batch_ids, azure=azure, resource_id=run.hook.resource_id,
                                    base_url=None if azure else str(run.hook.client.base_url))


class OpenAIBatchOperator(RequestInput, _OpenAIBatchLifecycle):
    """Run requests through the OpenAI or Azure OpenAI Batch API and land every answer in object storage.

    Validates and splits the input to the service's limits (nothing is uploaded if any line is bad), refuses
    a run estimated over ``max_cost_usd``, uploads and submits every shard, then waits in the triggerer
    (``deferrable``) or in the worker. Finished batches are downloaded and merged into ``output_path``:
    ``results.jsonl`` (input order), ``failures.jsonl`` and ``manifest.json``; the manifest is the return
    value. Failures a retry can fix (429, 5xx, expired, timed out) are resubmitted alone, up to
    ``retry_failed_requests`` rounds. A retried task re-attaches to the batches it already created.

    The connection's type picks OpenAI or Azure: on Azure, ``model`` is the deployment name.

    .. seealso:: :ref:`howto/operator:OpenAIBatchOperator`

    :param conn_id: a ``synth_openai``, ``synth_azure_openai`` or ``openai`` connection.
    :param output_path: the output folder (local path, ``s3://``..., or ``ObjectStoragePath``), one per task
        instance (with ``{{ ti.map_index }}`` when mapped: see :mod:`~airflow_provider_synth.batch.claims`).
        Work files (shards, downloads, the plan) go to ``<output_path>/_work``.
    :param input_path: an OpenAI batch JSONL file (local, URL or ``ObjectStoragePath``).
    :param requests: instead of ``input_path``: request lines, or records built with ``template`` (an XCom
        reference such as a task's output works too). Airflow's rendered fields show only their count and first
        ids, never the prompts; to keep prompts out of the metadata database altogether (XCom included), write
        them to object storage and pass ``input_path``.
    :param model: the model (or Azure deployment) for built requests.
    :param template: how records become requests (:class:`RequestTemplate`); built requests go to
        ``config.endpoint`` (default ``/v1/chat/completions``).
    :param retry_failed_requests: retry rounds (default 2): the failures a retry can fix (429, 5xx, expired,
        timed out, answers the output checks refused) are resubmitted alone, up to this many times; each round
        is estimated against ``max_cost_usd`` before it is submitted.
    :param max_cost_usd: refuse to submit (nothing uploaded) when the estimated cost at batch prices is above
        this; it also bounds the retry rounds and the direct-API tail of ``checks.direct_tail``.
    :param poll_interval: seconds between status checks; default: 60 against a service, 2 against a server on
        this machine (``127.0.0.1``/``localhost``, e.g. the local Batch API server).
    :param timeout: the whole run's budget, counted from the first submission (a retry never extends it);
        on expiry the batches are cancelled (unless ``config.cancel_on_kill`` is off).
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param max_failed_ratio: the largest share of failed requests the task accepts (0 = none).
    :param checks: output checks (:class:`~airflow_provider_synth.batch.checks.OutputChecks`): cut-off, refused
        or off-schema answers go to ``failures.jsonl`` (never to results) and are retried alone in the retry
        rounds; with a schema (default: the template's ``response_format``) results carry the ``parsed``
        object. ``checks.direct_tail=N`` answers a retry round of at most N requests through the synchronous
        API (direct price, within ``max_cost_usd``) instead of another batch.
    :param invalid_requests: ``"fail"`` (default): one invalid line refuses the whole input before anything is
        uploaded, naming every bad line. ``"skip"``: only the valid lines are submitted; each invalid one is a
        failure row (reason and line number; ``line-<n>`` when it has no usable custom_id) in
        ``failures.jsonl``, counted in the manifest's ``invalid`` and against ``max_failed_ratio``.
    :param config: the Batch API's own knobs (:class:`OpenAIBatchConfig`): shard ``limits``,
        ``completion_window``, ``max_active_batches`` (waves), ``token_limit_resubmits``, ``prices``,
        ``cancel_on_kill``, ``expires_after``, ``endpoint`` (of built requests) and ``wait_for_completion``
        (``False`` submits and returns the manifest at once: collect with
        :class:`~airflow_provider_synth.sensors.openai_batch.OpenAIBatchSensor` and
        :class:`OpenAIBatchResultsOperator`). Given as keyword arguments of their own (``endpoint=``,
        ``wait_for_completion=``...) they still work, with a ``DeprecationWarning``.
    """

    template_fields: Sequence[str] = ("input_path", "output_path", "requests", "model")

    priced = True

    def __init__(
        self,
        *,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        output_path: Any = None,
        input_path: Any = None,
        requests: Any = None,
        model: str | None = None,
        template: RequestTemplate | None = None,
        retry_failed_requests: int | None = None,
        max_cost_usd: float | None = None,
        poll_interval: float | None = None,
        timeout: timedelta | float = DEFAULT_TIMEOUT,
        deferrable: bool = DEFAULT_DEFERRABLE,
        max_failed_ratio: float = 0.0,
        checks: OutputChecks | None = None,
        invalid_requests: InvalidRequests = "fail",
        config: OpenAIBatchConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if output_path is None:
            raise ValueError("output_path is required")
        super().__init__(conn_id=conn_id, output_path=output_path, poll_interval=poll_interval, timeout=timeout,
                         deferrable=deferrable, max_failed_ratio=max_failed_ratio, checks=checks,
                         invalid_requests=invalid_requests, config=config, **kwargs)
        self.take_input(input_path, requests, model, template)  # and checks' default: a schema the user wrote
        self.retry_failed_requests: int = self.argument_over_config("retry_failed_requests", retry_failed_requests)
        self.max_cost_usd: float | None = self.argument_over_config("max_cost_usd", max_cost_usd)

    @property
    def wait_for_completion(self) -> bool:
        return self.config.wait_for_completion

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint of requests built from records (``config.endpoint``)."""
        return self.config.endpoint  # type: ignore[return-value]

    # -- planning ---------------------------------------------------------------------------------------------

    def _plan(self, context: Context) -> Plan:
        """Validate and split (before anything is uploaded), check the budget, write the plan."""
        cfg = self.config
        output = as_path(self.output_path)
        work = join_path(output, "_work")
        source = self.request_source(work, self.endpoint)
        split = split_requests(source, lambda i: open_path(join_path(work, f"shards/shard-{i:05d}-r0.jsonl"), "wb"),
                               limits=cfg.shard_limits, name=str(source),
                               estimate_tokens=self.max_cost_usd is not None, invalid_requests=self.invalid_requests,
                               open_rejected=lambda: open_path(join_path(work, INVALID_FILE), "wb"),
                               url_form=self.hook.url_form,
                               endpoints=AZURE_ENDPOINTS if self.hook.is_azure else OPENAI_ENDPOINTS)
        key = self.identity(context).run_key(split.endpoint or "", split.fingerprint, sep="|", length=32)
        est = estimate_cost(split.est_input_tokens, split.est_output_tokens, split.model, cfg.prices)
        self._check_budget(est, split.model, split.est_input_tokens, split.est_output_tokens)
        plan = Plan(key=key, conn_id=self.conn_id, endpoint=split.endpoint or self.endpoint, model=split.model,
                    completion_window=cfg.completion_window, work_dir=str(work), output_dir=str(output),
                    shards=[s.as_dict() for s in split.shards], total=split.total, fingerprint=split.fingerprint,
                    est_input_tokens=split.est_input_tokens, est_output_tokens=split.est_output_tokens,
                    est_cost_usd=est, checks=self.checks.to_spec() if self.checks is not None else None,
                    invalid=split.invalid, expires_after_s=cfg.expires_after_s,
                    prices={m: list(p) for m, p in cfg.prices.items()})
        if split.invalid:
            self.log.warning(skipped_summary(split.invalid, split.synthetic_ids, join_path(output, "failures.jsonl")))
        self.log.info("%d request(s) in %d shard(s) for %s %s; run key %s", split.total, len(split.shards),
                      plan.endpoint, plan.model, key)
        return plan

    def _check_budget(self, est: float | None, model: str | None, tokens_in: int, tokens_out: int) -> None:
        check_budget(est, self.max_cost_usd, model=model, input_tokens=tokens_in, output_tokens=tokens_out,
                     log=self.log)

    def output_folder(self) -> Any:
        return None if self.output_path is None else as_path(self.output_path)

    def start_run(self, context: Context) -> SynthRun:
        OpenAIBatchLink.start(self)
        plan = self._plan(context)
        existing = _load_plan(plan.work_dir)
        if existing is not None and existing.key == plan.key:
            plan.created_at = existing.created_at  # a retry keeps the first try's clock
            plan.submitted_at = existing.submitted_at
        plan.save(plan.work_dir)
        return self.attach(plan)


class OpenAIBatchResultsOperator(_OpenAIBatchLifecycle):
    """Collect the batches an ``OpenAIBatchOperator(wait_for_completion=False)`` submitted: wait (deferred or
    not), run the retry rounds, merge into the output folder and return the manifest. The connection and the
    output folder are the submitting task's (its plan records them); it claims nothing.

    :param submitted: the submitting task's manifest (its XCom), or its output folder.
    :param poll_interval: seconds between status checks (default as :class:`OpenAIBatchOperator`'s).
    :param timeout: the run's budget, counted from its first submission.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param max_failed_ratio: the largest share of failed requests the task accepts (0 = none).
    :param checks: output checks (default: those the submitting task recorded in its plan).
    :param retry_failed_requests: retry rounds (default 2), as :class:`OpenAIBatchOperator`'s.
    :param max_cost_usd: the budget the retry rounds (and a direct-API tail) are estimated against, as
        :class:`OpenAIBatchOperator`'s.
    :param config: waves, resubmissions, prices (:class:`OpenAIBatchConfig`).
    """

    template_fields: Sequence[str] = ("submitted",)

    def __init__(
        self,
        *,
        submitted: Any,
        poll_interval: float | None = None,
        timeout: timedelta | float = DEFAULT_TIMEOUT,
        deferrable: bool = DEFAULT_DEFERRABLE,
        max_failed_ratio: float = 0.0,
        checks: OutputChecks | None = None,
        retry_failed_requests: int | None = None,
        max_cost_usd: float | None = None,
        config: OpenAIBatchConfig | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("conn_id", None)  # the plan's connection is the one its batches were created with
        super().__init__(poll_interval=poll_interval, timeout=timeout, deferrable=deferrable,
                         max_failed_ratio=max_failed_ratio, checks=checks, config=config, **kwargs)
        self.submitted = submitted
        self.retry_failed_requests: int = self.argument_over_config("retry_failed_requests", retry_failed_requests)
        self.max_cost_usd: float | None = self.argument_over_config("max_cost_usd", max_cost_usd)

    def output_folder(self) -> Any:
        return None

    def _work_dir(self) -> Any:
        sub = self.submitted
        return as_path(sub["work_dir"] if isinstance(sub, Mapping) else join_path(str(sub), "_work"))

    def start_run(self, context: Context) -> SynthRun:
        OpenAIBatchLink.start(self)
        return self.attach(Plan.load(self._work_dir()))


def _load_plan(work_dir: str) -> Plan | None:
    try:
        return Plan.load(as_path(work_dir))
    except (FileNotFoundError, OSError):
        return None
