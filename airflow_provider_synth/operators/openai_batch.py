"""Operators for the OpenAI and Azure OpenAI Batch API: records in, every answer landed in object storage."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.manifest import write_manifest
from airflow_provider_synth.batch.paths import as_path, join_path, open_path
from airflow_provider_synth.batch.paths import exists as path_exists
from airflow_provider_synth.batch.requests import (
    AZURE_ENDPOINTS,
    CHAT,
    OPENAI_ENDPOINTS,
    Endpoint,
    build_requests,
    write_requests,
)
from airflow_provider_synth.batch.split import ShardLimits, split_requests
from airflow_provider_synth.batch.status import Next
from airflow_provider_synth.batch.usage import Price, estimate_cost, format_usd
from airflow_provider_synth.batch.validate import InvalidRequests, check_invalid_requests, skipped_summary
from airflow_provider_synth.exceptions import (
    BatchFailedError,
    BatchTimeoutError,
    BudgetExceededError,
)
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.links import OpenAIBatchLink
from airflow_provider_synth.operators._native import ManifestPublisherMixin, OutputClaimMixin
from airflow_provider_synth.runs.openai import INVALID_FILE, BatchRun, Plan, idempotency_key, run_manifest
from airflow_provider_synth.runs.openai_direct import Tier
from airflow_provider_synth.triggers.base import validate_event
from airflow_provider_synth.triggers.openai_batch import OpenAIBatchTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

#: the Batch API's window is 24 h; leave room for finalizing and one retry round
DEFAULT_TIMEOUT = timedelta(hours=26)
#: uploads and outputs expire on the service after this (its longest), so nothing piles up in the account
DEFAULT_EXPIRES_AFTER = timedelta(days=30)


@dataclass(frozen=True)
class RequestTemplate:
    """How to turn records into requests (see :func:`airflow_provider_synth.batch.requests.build_requests`).

    :param prompt_template: a ``str.format`` template over each record's fields (the user message).
    :param system: a system message (chat) or ``instructions`` (responses) for every request.
    :param builder: a callable building a body, a list of messages/inputs, or a text from one record.
    :param id_field: the record field holding a unique id; default: ``request-<index>``.
    :param params: body fields for every request (``temperature``, ``max_completion_tokens``...).
    :param response_format: a pydantic model class or JSON schema for structured output.
    :param tools: function tools for every chat request.
    """

    prompt_template: str | None = None
    system: str | None = None
    builder: Callable[[Mapping[str, Any]], Any] | None = None
    id_field: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    response_format: Any = None
    tools: Sequence[Mapping[str, Any]] | None = None


def _is_request_line(item: Any) -> bool:
    return isinstance(item, Mapping) and "custom_id" in item and "body" in item


class PromptRecords(Sequence[Any]):
    """The records or request lines given as ``requests``, kept out of Airflow's rendered fields.

    Airflow stores every templated field, rendered, in the metadata database and shows it in the UI; prompts
    may hold personal data. For an object with ``serialize()`` it stores what that returns: here a count and
    the first ids, never the records themselves.

    :param items: the records or request lines.
    :param id_field: the record field holding the id (as in :class:`RequestTemplate`).
    """

    SHOWN_IDS = 3

    def __init__(self, items: Iterable[Any], id_field: str | None = None) -> None:
        self._items = list(items)
        self._id_field = id_field

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        return self._items[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def _id(self, index: int) -> str:
        item = self._items[index]
        if _is_request_line(item):
            return str(item["custom_id"])
        if self._id_field and isinstance(item, Mapping) and self._id_field in item:
            return str(item[self._id_field])
        return f"request-{index}"

    def serialize(self) -> str:
        """What Airflow stores and shows for the field: the count and the first ids."""
        ids = [self._id(i) for i in range(min(len(self._items), self.SHOWN_IDS))]
        more = ", ..." if len(self._items) > len(ids) else ""
        return f"{len(self._items)} record(s), not stored as a rendered field; ids: {', '.join(ids)}{more}"

    __repr__ = __str__ = serialize


class OpenAIBatchOperator(OutputClaimMixin, ManifestPublisherMixin, BaseOperator):
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
    :param endpoint: the endpoint of built requests.
    :param template: how records become requests.
    :param limits: shard limits (requests, bytes, embedding inputs, estimated tokens per batch).
    :param completion_window: the batch window (``24h``).
    :param poll_interval: seconds between status checks.
    :param timeout: the whole run's budget, counted from the first submission (a retry never extends it);
        on expiry the batches are cancelled.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param wait_for_completion: ``False`` submits and returns the manifest at once (use
        :class:`~airflow_provider_synth.sensors.openai_batch.OpenAIBatchSensor` and
        :class:`OpenAIBatchResultsOperator`).
    :param max_failed_ratio: the largest share of failed requests the task accepts (0 = none).
    :param retry_failed_requests: retry rounds for retryable failures.
    :param max_active_batches: at most this many of the task's batches in flight at once; the other shards
        wait for them (in waves). With ``limits=ShardLimits(max_tokens=T)`` it keeps the task's enqueued tokens
        under ``max_active_batches * T``, inside the model's enqueued-token limit. Default: every shard at once.
    :param token_limit_resubmits: how many times a batch the service refused because the model's
        enqueued-token limit was full (``token_limit_exceeded``: nothing processed, nothing billed) is submitted
        again, each time after the batches running beside it finished. It does not count as a retry round.
    :param max_cost_usd: refuse to submit when the estimated cost is above this.
    :param cancel_on_kill: cancel the running batches when the task is killed or times out.
    :param prices: ``{model: (input, cached_input, output)}`` USD per 1M tokens, over the built-in table.
    :param checks: output checks (:class:`~airflow_provider_synth.batch.checks.OutputChecks`): cut-off, refused
        or off-schema answers go to ``failures.jsonl`` (never to results) and are retried alone in the retry
        rounds; with a schema (default: the template's ``response_format``) results carry the ``parsed``
        object. ``checks.direct_tail=N`` answers a retry round of at most N requests through the synchronous
        API (direct price, within ``max_cost_usd``) instead of another batch.
    :param invalid_requests: ``"fail"`` (default): one invalid line refuses the whole input before anything is
        uploaded, naming every bad line. ``"skip"``: only the valid lines are submitted; each invalid one is a
        failure row (reason and line number; ``line-<n>`` when it has no usable custom_id) in
        ``failures.jsonl``, counted in the manifest's ``invalid`` and against ``max_failed_ratio``.
    :param expires_after: the service deletes this task's uploads and its batches' output and error files
        this long after their creation (1 hour to 30 days; default 30 days); ``None`` keeps them until a
        clean-up deletes them. The results are downloaded to ``output_path`` when the batches finish.
    """

    template_fields: Sequence[str] = ("input_path", "output_path", "requests", "model")
    operator_extra_links = (OpenAIBatchLink(),)
    ui_color = "#d7f0e6"
    #: this operator plans a run from its input; :class:`OpenAIBatchResultsOperator` finds a planned one
    _plans_input: ClassVar[bool] = True

    @property
    def requests(self) -> Any:
        return self._requests

    @requests.setter
    def requests(self, value: Any) -> None:
        # set at construction and again when Airflow renders the field (an XCom resolved to the records)
        if isinstance(value, list | tuple):
            template = getattr(self, "template", None)
            value = PromptRecords(value, template.id_field if template is not None else None)
        self._requests = value

    def __init__(
        self,
        *,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        output_path: Any = None,
        input_path: Any = None,
        requests: Any = None,
        model: str | None = None,
        endpoint: Endpoint = CHAT,
        template: RequestTemplate | None = None,
        limits: ShardLimits | None = None,
        completion_window: str = "24h",
        poll_interval: float = 60.0,
        timeout: timedelta | float = DEFAULT_TIMEOUT,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        wait_for_completion: bool = True,
        max_failed_ratio: float = 0.0,
        retry_failed_requests: int = 2,
        max_active_batches: int | None = None,
        token_limit_resubmits: int = 20,
        max_cost_usd: float | None = None,
        cancel_on_kill: bool = True,
        prices: Mapping[str, Price | tuple[float, float, float]] | None = None,
        checks: OutputChecks | None = None,
        invalid_requests: InvalidRequests = "fail",
        expires_after: timedelta | float | None = DEFAULT_EXPIRES_AFTER,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self._plans_input and (input_path is None) == (requests is None):
            raise ValueError("give exactly one of input_path or requests")
        if self._plans_input and output_path is None:
            raise ValueError("output_path is required")
        if not 0.0 <= max_failed_ratio <= 1.0:
            raise ValueError(f"max_failed_ratio must be within [0, 1], got {max_failed_ratio}")
        if retry_failed_requests < 0 or poll_interval <= 0:
            raise ValueError("retry_failed_requests must be >= 0 and poll_interval > 0")
        if (max_active_batches is not None and max_active_batches < 1) or token_limit_resubmits < 0:
            raise ValueError("max_active_batches must be >= 1 (or None) and token_limit_resubmits >= 0")
        self.model, self.endpoint, self.template = model, endpoint, template or RequestTemplate()
        self.conn_id, self.output_path, self.input_path, self.requests = conn_id, output_path, input_path, requests
        self.limits = limits or ShardLimits()
        self.completion_window, self.poll_interval = completion_window, float(poll_interval)
        self.timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        self.deferrable, self.wait_for_completion = deferrable, wait_for_completion
        self.max_failed_ratio, self.retry_failed_requests = max_failed_ratio, retry_failed_requests
        self.max_active_batches, self.token_limit_resubmits = max_active_batches, token_limit_resubmits
        self.max_cost_usd, self.cancel_on_kill, self.prices = max_cost_usd, cancel_on_kill, dict(prices or {})
        self.checks = checks
        if checks is not None and checks.schema is None and self.template.response_format is not None:
            self.checks = dataclasses.replace(checks, schema=self.template.response_format)
        self.invalid_requests = check_invalid_requests(invalid_requests)
        self.expires_after_s = None if expires_after is None else int(
            expires_after.total_seconds() if isinstance(expires_after, timedelta) else expires_after)
        if self.expires_after_s is not None and not 3600 <= self.expires_after_s <= 30 * 86400:
            raise ValueError(f"expires_after must be between 1 hour and 30 days, got {self.expires_after_s}s")
        self._run: BatchRun | None = None

    @property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(self.conn_id)

    # -- planning ---------------------------------------------------------------------------------------------

    def _source(self, work: Any) -> Any:
        if self.input_path is not None:
            source = as_path(self.input_path)
            if not path_exists(source):
                raise FileNotFoundError(f"input_path {self.input_path} does not exist; nothing was submitted. Write "
                                        "the request JSONL there first (e.g. in an upstream task) or pass requests=")
            return source
        items = list(self.requests)
        if not all(_is_request_line(i) for i in items):
            if not self.model:
                raise ValueError("building requests from records needs model=")
            t = self.template
            items = list(build_requests(items, model=self.model, endpoint=self.endpoint, builder=t.builder,
                                        prompt_template=t.prompt_template, system=t.system, id_field=t.id_field,
                                        params=t.params, response_format=t.response_format, tools=t.tools))
        path = join_path(work, "requests.jsonl")
        with open_path(path, "wb") as fp:
            write_requests(items, fp)
        return path

    def _plan(self, context: Context) -> Plan:
        """Validate and split (before anything is uploaded), check the budget, write the plan."""
        output = as_path(self.output_path)
        work = join_path(output, "_work")
        source = self._source(work)
        split = split_requests(source, lambda i: open_path(join_path(work, f"shards/shard-{i:05d}-r0.jsonl"), "wb"),
                               limits=self.limits, name=str(source),
                               estimate_tokens=self.max_cost_usd is not None, invalid_requests=self.invalid_requests,
                               open_rejected=lambda: open_path(join_path(work, INVALID_FILE), "wb"),
                               url_form=self.hook.url_form,
                               endpoints=AZURE_ENDPOINTS if self.hook.is_azure else OPENAI_ENDPOINTS)
        ti = context["ti"]
        map_index = ti.map_index if ti.map_index is not None else -1
        key = idempotency_key(ti.dag_id, ti.task_id, ti.run_id, map_index, split.fingerprint, split.endpoint or "")
        est = estimate_cost(split.est_input_tokens, split.est_output_tokens, split.model, self.prices)
        if self.max_cost_usd is not None:
            self._check_budget(est, split.model, split.est_input_tokens, split.est_output_tokens)
        plan = Plan(key=key, conn_id=self.conn_id, endpoint=split.endpoint or self.endpoint, model=split.model,
                    completion_window=self.completion_window, work_dir=str(work), output_dir=str(output),
                    shards=[s.as_dict() for s in split.shards], total=split.total, fingerprint=split.fingerprint,
                    est_input_tokens=split.est_input_tokens, est_output_tokens=split.est_output_tokens,
                    est_cost_usd=est, checks=self.checks.to_spec() if self.checks is not None else None,
                    invalid=split.invalid, expires_after_s=self.expires_after_s)
        if split.invalid:
            self.log.warning(skipped_summary(split.invalid, split.synthetic_ids, join_path(output, "failures.jsonl")))
        self.log.info("%d request(s) in %d shard(s) for %s %s; run key %s", split.total, len(split.shards),
                      plan.endpoint, plan.model, key)
        return plan

    def _check_budget(self, est: float | None, model: str | None, tokens_in: int, tokens_out: int) -> None:
        if est is None:
            raise BudgetExceededError(f"max_cost_usd is set but model {model!r} has no known price: add it to "
                                      "prices= to estimate the cost; nothing was submitted")
        if est > float(self.max_cost_usd or 0):
            raise BudgetExceededError(
                f"estimated cost {format_usd(est)} ({tokens_in:,} input tokens, up to {tokens_out:,} output "
                f"tokens at batch prices for {model}) is over max_cost_usd=${self.max_cost_usd}; nothing was submitted")

    # -- execution --------------------------------------------------------------------------------------------

    def output_folder(self) -> Any:
        return None if self.output_path is None else as_path(self.output_path)

    def execute(self, context: Context) -> dict[str, Any]:
        self.claim_output(context)
        OpenAIBatchLink.start(self)
        plan = self._plan(context)
        existing = _load_plan(plan.work_dir)
        if existing is not None and existing.key == plan.key:
            plan.created_at = existing.created_at  # a retry keeps the first try's clock
        plan.save(plan.work_dir)
        run = self._attach(plan)
        run.submit(self._next_round(run), self.max_active_batches)
        self._persist_links(context, run)
        if not self.wait_for_completion:
            return self._manifest(context, run, None, status="submitted")
        return self._wait_or_finish(context, run)

    def _attach(self, plan: Plan) -> BatchRun:
        run = BatchRun(OpenAIBatchHook(plan.conn_id), plan, as_path, self.checks)
        run.discover()
        if run.batches:
            self.log.info("found %d batch(es) of this run (key %s): %s", len(run.batches), plan.key, run.statuses())
        self._run = run
        return run

    def _next_round(self, run: BatchRun) -> list[tuple[int, int]]:
        """The rounds to submit; with a direct-API tail, small retry rounds are answered here instead."""
        todo = run.next_round(self.retry_failed_requests, self.token_limit_resubmits)
        checks = self.checks or OutputChecks()
        # a direct round a crashed try left unfinished is finished directly, whatever the tail is set to now
        while todo and (checks.direct_tail or any(run.direct.get(*t) is not None for t in todo)):
            budget = None
            if self.max_cost_usd is not None:
                budget = self.max_cost_usd - (run.plan.est_cost_usd or 0.0)
            rest = run.answer_directly(todo, checks.direct_tail, checks.direct_concurrency, budget, self.prices,
                                       Tier(checks.direct_service_tier, checks.direct_tier_fallback))
            if rest == todo:
                break
            todo = run.next_round(self.retry_failed_requests, self.token_limit_resubmits)
        return todo

    def _end_time(self, run: BatchRun) -> float:
        start = run.first_created_at or time.time()
        return start + self.timeout_s

    def _wait_or_finish(self, context: Context, run: BatchRun) -> dict[str, Any]:
        while True:
            if not run.running_ids:
                todo = self._next_round(run)
                if not todo:
                    return self._finish(context, run)
                run.submit(todo, self.max_active_batches)
                self._persist_links(context, run)
            end_time = self._end_time(run)
            if self.deferrable:
                self.defer(
                    trigger=OpenAIBatchTrigger(conn_id=run.plan.conn_id, batch_ids=run.running_ids,
                                               poll_interval=self.poll_interval, end_time=end_time,
                                               cancel_on_kill=self.cancel_on_kill),
                    method_name="execute_complete",
                    timeout=timedelta(seconds=max(end_time - time.time(), 0) + 600),
                )
            self._wait_in_worker(run, end_time)

    def _wait_in_worker(self, run: BatchRun, end_time: float) -> None:
        result = run.wait(self.poll_interval, end_time, progress=lambda s: self.log.info("batches: %s", s))
        if result.next is Next.TIMEOUT:
            self._on_timeout(run)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: collect, maybe start a retry round (and defer again), or merge."""
        event = validate_event(event, OpenAIBatchTrigger.event_key)
        run = self._attach(Plan.load(self._work_dir()))
        run.refresh(event["batches"])
        if event["status"] == "timeout":
            self._on_timeout(run)
        if event["status"] == "error":
            raise BatchFailedError(f"waiting for batches failed: {event.get('message')}")
        return self._wait_or_finish(context, run)

    def _work_dir(self) -> Any:
        """Where the plan of this task's run lives (the resumed task instance is a new object)."""
        return join_path(as_path(self.output_path), "_work")

    def _on_timeout(self, run: BatchRun) -> None:
        running = run.running_ids
        if self.cancel_on_kill:
            for batch_id in running:
                run.hook.cancel_batch(batch_id)
        raise BatchTimeoutError(f"timeout of {self.timeout_s:.0f}s passed with {len(running)} batch(es) still "
                                f"running{' (cancelled)' if self.cancel_on_kill else ''}: {running}. Retry the "
                                "task to collect what finished; it re-attaches and pays for nothing twice.")

    def _finish(self, context: Context, run: BatchRun) -> dict[str, Any]:
        acct = run.merge()
        manifest = self._manifest(context, run, acct.as_dict(), status="completed")
        manifest.update(run.costs(acct, self.prices))
        cost = manifest["cost_usd"]
        write_manifest(as_path(run.plan.output_dir), manifest)
        self.publish_manifest(context, manifest)
        failed = acct.failed + acct.missing
        ratio = failed / acct.total if acct.total else 0.0
        self.log.info("%d succeeded, %d failed, %d missing of %d; usage %s; cost %s", acct.succeeded,
                      acct.failed, acct.missing, acct.total, acct.usage.as_dict(), format_usd(cost))
        if ratio > self.max_failed_ratio:
            codes = ", ".join(f"{c}: {n}" for c, n in acct.error_codes.most_common(5))
            raise BatchFailedError(
                f"{failed} of {acct.total} requests failed ({ratio:.1%} > max_failed_ratio "
                f"{self.max_failed_ratio:.1%}); errors {codes}. Failed requests and their errors are in "
                f"{manifest['failures_path']}, results of the rest in {manifest['results_path']}.")
        return manifest

    def _manifest(self, context: Context, run: BatchRun, accounting: dict[str, Any] | None,
                  status: str) -> dict[str, Any]:
        ti = context["ti"]
        return run_manifest(run, accounting, status, try_number=ti.try_number, dag_id=ti.dag_id,
                            task_id=ti.task_id, run_id=ti.run_id, map_index=ti.map_index)

    def _persist_links(self, context: Context, run: BatchRun) -> None:
        """Store the dashboard link before deferring, so it works while the task waits."""
        if run.batch_ids:
            azure = run.hook.is_azure
            OpenAIBatchLink.persist(context, run.batch_ids, azure=azure, resource_id=run.hook.resource_id,
                                    base_url=None if azure else str(run.hook.client.base_url))

    def on_kill(self) -> None:
        """Cancel the batches of this run that are still running (worker-side wait)."""
        run = self._run
        if run is None or not self.cancel_on_kill:
            return
        for batch_id in run.running_ids:
            try:
                run.hook.cancel_batch(batch_id)
                self.log.info("cancelled batch %s", batch_id)
            except Exception as exc:  # best effort: the kill must go on
                self.log.warning("could not cancel batch %s: %s", batch_id, type(exc).__name__)


class OpenAIBatchResultsOperator(OpenAIBatchOperator):
    """Collect the batches an ``OpenAIBatchOperator(wait_for_completion=False)`` submitted: wait (deferred or
    not), run the retry rounds, merge into the output folder and return the manifest.

    :param submitted: the submitting task's manifest (its XCom), or its output folder.
    :param kwargs: the same policy arguments as :class:`OpenAIBatchOperator`; the connection and the output
        folder are the submitting task's (its plan records them).
    """

    template_fields: Sequence[str] = ("submitted",)

    _plans_input = False

    def __init__(self, *, submitted: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.submitted = submitted

    def _work_dir(self) -> Any:
        sub = self.submitted
        return as_path(sub["work_dir"] if isinstance(sub, Mapping) else join_path(str(sub), "_work"))

    def execute(self, context: Context) -> dict[str, Any]:
        OpenAIBatchLink.start(self)
        run = self._attach(Plan.load(self._work_dir()))
        self._persist_links(context, run)
        return self._wait_or_finish(context, run)


def _load_plan(work_dir: str) -> Plan | None:
    try:
        return Plan.load(as_path(work_dir))
    except (FileNotFoundError, OSError):
        return None
