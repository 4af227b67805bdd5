"""``AnthropicBatchOperator``: records in, Claude's answers through the Message Batches API, every one landed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.paths import as_path, join_path
from airflow_provider_synth.batch.requests import CHAT, RequestTemplate
from airflow_provider_synth.batch.split import ShardLimits
from airflow_provider_synth.batch.usage import Price, check_budget
from airflow_provider_synth.batch.validate import InvalidRequests
from airflow_provider_synth.hooks.anthropic import AnthropicBatchHook
from airflow_provider_synth.operators._base import (
    DEFAULT_DEFERRABLE,
    RequestInput,
    SynthBatchOperator,
)
from airflow_provider_synth.runs.anthropic import ANTHROPIC_LIMITS, AnthropicPlan, AnthropicRun, plan_run
from airflow_provider_synth.runs.anthropic_messages import (
    DEFAULT_MAX_TOKENS,
    Sampling,
    StructuredOutput,
    Translation,
)
from airflow_provider_synth.triggers.anthropic import AnthropicBatchTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_synth.runs.base import SynthRun

#: a batch expires 24 h after its creation; leave room for a retry round
DEFAULT_TIMEOUT = timedelta(hours=26)


@dataclass(frozen=True)
class AnthropicBatchConfig:
    """The Message Batches backend's own knobs (what every backend shares is an operator argument).

    The ``anthropic-version`` the requests are sent with is the connection's (extra ``api_version``; default
    the SDK's, ``2026-10-21``): it decides what OpenAI lines become (:class:`Translation`).

    :param default_max_tokens: ``max_tokens`` of an OpenAI line that sets neither ``max_tokens`` nor
        ``max_completion_tokens`` (Anthropic requires it).
    :param sampling: what to do with ``temperature``, ``top_p``, ``seed``, penalties and ``logit_bias`` the API
        version cannot take: ``"error"`` refuses the line before anything is sent, ``"drop"`` sends it without
        them (counted in the manifest's ``translation.dropped``).
    :param structured_output: ``response_format`` (JSON schema) as ``output_config.format`` or as one forced
        tool; ``"auto"``: ``output_config`` on ``2026-10-21``, the tool on ``2023-06-01``.
    :param limits: requests and bytes per batch (at most Anthropic's 100,000 and 256 MB).
    :param prices: ``{model: (input, cache read, output)}`` USD per 1M tokens at the direct price, over the
        built-in table (:data:`~airflow_provider_synth.runs.anthropic_messages.ANTHROPIC_PRICES`); the batch
        bills half, cache writes 1.25 x input.
    :param cancel_on_kill: cancel the running batches when the task is killed or times out.
    """

    default_max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: Sampling = "error"
    structured_output: StructuredOutput = "auto"
    limits: ShardLimits = ANTHROPIC_LIMITS
    prices: Mapping[str, Price | tuple[float, float, float]] = field(default_factory=dict)
    cancel_on_kill: bool = True

    def translation(self, api_version: str, model: str | None) -> Translation:
        return Translation(api_version=api_version, default_max_tokens=self.default_max_tokens,
                           sampling=self.sampling, structured_output=self.structured_output, model=model)


class AnthropicBatchOperator(RequestInput, SynthBatchOperator):
    """Run requests through Anthropic's Message Batches API (half the direct price) and land every answer.

    Takes the same OpenAI batch JSONL as every backend (or Anthropic's own ``{"custom_id", "params"}`` lines),
    translated per line before anything is sent; a line that cannot be translated faithfully refuses the input,
    naming file, line and custom_id. Splits at 100,000 requests / 256 MB, refuses a run estimated over
    ``max_cost_usd``, submits every batch (an intent recorded before each create, so a retried task re-attaches
    instead of paying twice), waits in the triggerer (``deferrable``) or the worker, resubmits only what a retry
    can fix for ``retry_failed_requests`` rounds, and lands ``results.jsonl`` (input order, the users' custom_ids,
    Anthropic's messages), ``failures.jsonl`` and ``manifest.json`` (the XCom) in ``output_path``.

    .. seealso:: :doc:`/operators/anthropic`

    :param conn_id: an ``anthropic`` connection (the official provider's type: API key in the password).
    :param output_path: the output folder, one per task instance (``{{ ti.map_index }}`` when mapped).
    :param input_path: a request JSONL file (local, URL or ``ObjectStoragePath``).
    :param requests: instead of ``input_path``: request lines, or records built with ``template`` and ``model``.
    :param model: the Claude model of built requests, and of lines that name none.
    :param template: how records become requests (:class:`~airflow_provider_synth.batch.requests.RequestTemplate`).
    :param retry_failed_requests: retry rounds of the failures a retry can fix (``api_error``,
        ``overloaded_error``, rate limits, ``expired``, answers the checks refuse and retry).
    :param max_cost_usd: refuse to submit when the estimated cost (batch prices) is above this.
    :param poll_interval: seconds between status checks.
    :param timeout: the run's budget from its first submission; at the deadline the batches are cancelled.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param max_failed_ratio: the largest share of failed requests the task accepts (0 = none).
    :param checks: output checks: ``stop_reason: "max_tokens"`` is ``truncated``, ``refusal`` is ``refused``;
        a schema (default: the template's ``response_format``) validates the answers.
    :param invalid_requests: ``"fail"`` only: a line that cannot be sent refuses the input.
    :param config: :class:`AnthropicBatchConfig`.
    """

    template_fields: Sequence[str] = ("input_path", "output_path", "requests", "model")
    config_class = AnthropicBatchConfig
    priced = True
    trigger_class = AnthropicBatchTrigger
    default_conn_id = AnthropicBatchHook.default_conn_name
    default_timeout = DEFAULT_TIMEOUT
    ui_color = "#f0e2d7"
    config: AnthropicBatchConfig

    def __init__(
        self,
        *,
        conn_id: str = AnthropicBatchHook.default_conn_name,
        output_path: Any = None,
        input_path: Any = None,
        requests: Any = None,
        model: str | None = None,
        template: RequestTemplate | None = None,
        retry_failed_requests: int = 2,
        max_cost_usd: float | None = None,
        poll_interval: float = 60.0,
        timeout: timedelta | float = DEFAULT_TIMEOUT,
        deferrable: bool = DEFAULT_DEFERRABLE,
        max_failed_ratio: float = 0.0,
        checks: OutputChecks | None = None,
        invalid_requests: InvalidRequests = "fail",
        config: AnthropicBatchConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if output_path is None:
            raise ValueError("output_path is required")
        if invalid_requests != "fail":
            raise ValueError("invalid_requests='skip' is not supported by the Anthropic backend: a line that "
                             "cannot be translated refuses the input, naming it")
        if retry_failed_requests < 0:
            raise ValueError(f"retry_failed_requests must be >= 0, got {retry_failed_requests}")
        super().__init__(conn_id=conn_id, output_path=output_path, poll_interval=poll_interval, timeout=timeout,
                         deferrable=deferrable, max_failed_ratio=max_failed_ratio, checks=checks,
                         invalid_requests=invalid_requests, config=config, **kwargs)
        self.take_input(input_path, requests, model, template)  # and checks' default: a schema the user wrote
        self.retry_failed_requests, self.max_cost_usd = retry_failed_requests, max_cost_usd

    # -- the run ------------------------------------------------------------------------------------------

    def output_folder(self) -> Any:
        return as_path(self.output_path)

    def _work_dir(self) -> Any:
        return join_path(as_path(self.output_path), "_work")

    def start_run(self, context: Context) -> SynthRun:
        work = self._work_dir()
        hook = AnthropicBatchHook(self.conn_id)
        plan = plan_run(self.request_source(work, CHAT), work_dir=work, output_dir=as_path(self.output_path),
                        conn_id=self.conn_id, identity=self.identity(context),
                        options=self.config.translation(hook.api_version, self.model), limits=self.config.limits,
                        checks=self.checks, prices=self.config.prices)
        self._check_budget(plan)
        try:
            existing = AnthropicPlan.load(work)
        except (FileNotFoundError, OSError):
            existing = None
        if existing is not None and existing.key == plan.key:
            plan.created_at = existing.created_at  # a retry keeps the first try's clock
        plan.save()
        if plan.dropped:
            self.log.warning("sent without the fields the API version cannot take (sampling='drop'): %s",
                             plan.dropped)
        self.log.info("%d request(s) in %d batch(es) for %s (anthropic-version %s); run key %s", plan.total,
                      len(plan.shards), plan.model or "several models", plan.api_version, plan.key)
        return self._attach(hook, plan)

    def _attach(self, hook: AnthropicBatchHook, plan: AnthropicPlan) -> AnthropicRun:
        run = AnthropicRun(hook, plan, as_path, self.checks, max_rounds=self.retry_failed_requests,
                           max_cost_usd=self.max_cost_usd)
        run.attach()
        if run.batch_ids:
            self.log.info("found %d message batch(es) of this run: %s", len(run.batch_ids), run.states())
        return run

    def _check_budget(self, plan: AnthropicPlan) -> None:
        check_budget(plan.est_cost_usd, self.max_cost_usd, model=plan.model, input_tokens=plan.est_input_tokens,
                     output_tokens=plan.est_output_tokens, log=self.log,
                     unknown=f"model {plan.model!r} has no known price (or the input mixes models): add it to "
                             "config.prices")

    def resume_run(self, context: Context, event: Mapping[str, Any], kwargs: Mapping[str, Any]) -> SynthRun:
        plan = AnthropicPlan.load(self._work_dir())
        run = self._attach(AnthropicBatchHook(plan.conn_id), plan)
        run.refresh(event["batches"])
        return run

    def trigger_conn_id(self, run: SynthRun) -> str:
        assert isinstance(run, AnthropicRun)
        return run.plan.conn_id

    def make_trigger(self, run: SynthRun, end_time: float) -> BaseTrigger:
        assert isinstance(run, AnthropicRun)
        return AnthropicBatchTrigger(conn_id=run.plan.conn_id, batch_ids=run.running,
                                     poll_interval=self.poll_interval_for(run),
                                     end_time=end_time, cancel_on_kill=self.cancel_on_kill)
