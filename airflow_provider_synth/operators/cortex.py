"""Batch synthesis with Snowflake Cortex: one set-based ``AI_COMPLETE`` statement per chunk of a staged table.

The run itself (stage, submit, re-attach after a crash, wait, read back) is
:class:`~airflow_provider_synth.runs.cortex.CortexRun`; :class:`CortexBatchOperator` maps the Airflow context
onto it. :class:`CortexStagingCleanupOperator` drops the staging tables failed runs left, with
:func:`~airflow_provider_synth.runs.cortex_staging.staging_report` (what ``airflow-synth cortex-staging`` runs).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.paths import join_path
from airflow_provider_synth.batch.validate import InvalidRequests, check_invalid_requests
from airflow_provider_synth.exceptions import (
    BatchFailedError,
    BatchTimeoutError,
    SynthError,
    TriggerEventError,
)
from airflow_provider_synth.hooks.cortex import CortexHook
from airflow_provider_synth.operators._native import ManifestPublisherMixin, OutputClaimMixin
from airflow_provider_synth.runs.cortex import (
    READ_BLOCK_ROWS,
    CortexRun,
    CortexStaging,
    RunIdentity,
    RunState,
)
from airflow_provider_synth.runs.cortex_sql import TableSource
from airflow_provider_synth.runs.cortex_staging import staging_report, staging_report_text
from airflow_provider_synth.triggers.base import validate_event
from airflow_provider_synth.triggers.cortex import CortexStatementTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

__all__ = ["READ_BLOCK_ROWS", "CortexBatchOperator", "CortexStaging", "CortexStagingCleanupOperator", "TableSource"]


class CortexBatchOperator(OutputClaimMixin, ManifestPublisherMixin, BaseOperator):
    """Answer a batch of chat requests with Snowflake Cortex, inside the warehouse, and write the output folder.

    The requests (an OpenAI-format chat JSONL file, or an existing table) are validated, then staged into a
    table keyed by custom_id. Each chunk of ``chunk_size`` rows (by input order) is answered by ONE asynchronous
    ``INSERT ... SELECT AI_COMPLETE(...)`` that skips rows already answered, so a retried or resumed task never
    pays twice; per-row errors come back as data and become failures. The task defers while the statements run
    (or polls, when not deferrable), then reads the answers back in input order into ``results.jsonl``,
    ``failures.jsonl`` and ``manifest.json`` under ``output_path`` and returns the manifest.

    .. seealso::
        :ref:`howto/operator:CortexBatchOperator`

    :param output_path: the output folder (local path, URL or ObjectStoragePath), one per task instance (with
        ``{{ ti.map_index }}`` when mapped: see :mod:`~airflow_provider_synth.batch.claims`).
    :param input_path: an OpenAI-format ``/v1/chat/completions`` JSONL file; or
    :param source_table: an existing table of prompts or conversations (:class:`TableSource`).
    :param model: the Cortex model; default: the model the requests name.
    :param snowflake_conn_id: the Snowflake connection.
    :param chunk_size: rows per statement: bounds one statement's time and blast radius.
    :param staging: where the staging tables go (:class:`~airflow_provider_synth.runs.cortex.CortexStaging`).
    :param keep_staging_tables: keep the tables after a successful run (they are always kept after a failure,
        so that a retry resumes without paying twice).
    :param poll_interval: seconds between status polls.
    :param timeout: seconds the statements may run, counted from the first submission; then they are cancelled.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param max_failed_ratio: the share of failed or missing requests tolerated before the task fails.
    :param extra_models: model names to accept beyond the known Cortex models (new or fine-tuned ones).
    :param checks: output checks (:class:`~airflow_provider_synth.batch.checks.OutputChecks`): answers cut off,
        refused or off-schema go to ``failures.jsonl`` with their text, never to results; the manifest counts
        them under ``checks``. (Cortex has no retry rounds: a failed task retry does not re-answer them.)
    :param invalid_requests: ``"fail"`` (default): an invalid line refuses the file before anything runs in
        Snowflake. ``"skip"``: only the valid lines are staged; each invalid one is a failure row in
        ``failures.jsonl``, counted in the manifest's ``invalid`` and against ``max_failed_ratio``.
    """

    template_fields: Sequence[str] = ("input_path", "output_path", "model")
    ui_color = "#29b5e8"

    def __init__(
        self,
        *,
        output_path: Any,
        input_path: Any = None,
        source_table: TableSource | None = None,
        model: str | None = None,
        snowflake_conn_id: str = "snowflake_default",
        chunk_size: int = 1_000,
        staging: CortexStaging | None = None,
        keep_staging_tables: bool = False,
        poll_interval: float = 10.0,
        timeout: float = 6 * 3600.0,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        max_failed_ratio: float = 0.0,
        extra_models: Sequence[str] = (),
        checks: OutputChecks | None = None,
        invalid_requests: InvalidRequests = "fail",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (input_path is None) == (source_table is None):
            raise ValueError("set exactly one of input_path and source_table")
        if source_table is not None and not model:
            raise ValueError("model is required with source_table")
        if chunk_size < 1 or poll_interval <= 0 or timeout <= 0 or not 0 <= max_failed_ratio <= 1:
            raise ValueError("chunk_size >= 1, poll_interval > 0, timeout > 0 and 0 <= max_failed_ratio <= 1")
        self.output_path = output_path
        self.input_path = input_path
        self.source_table = source_table
        self.model = model
        self.snowflake_conn_id = snowflake_conn_id
        self.chunk_size = int(chunk_size)
        self.staging = staging or CortexStaging()
        self.keep_staging_tables = keep_staging_tables
        self.poll_interval = float(poll_interval)
        self.timeout = float(timeout)
        self.deferrable = deferrable
        self.max_failed_ratio = float(max_failed_ratio)
        self.extra_models = frozenset(extra_models)
        if checks is not None and checks.direct_tail:
            raise ValueError("checks.direct_tail is for the OpenAI and Azure Batch API only")
        self.checks = checks
        self.invalid_requests = check_invalid_requests(invalid_requests)
        self._query_ids: list[str] = []

    # -- the run -------------------------------------------------------------------------------------------

    def _run(self, context: Context) -> CortexRun:
        ti = context["ti"]
        ident = RunIdentity(ti.dag_id, ti.task_id, ti.run_id, -1 if ti.map_index is None else ti.map_index,
                            ti.try_number)
        hook = CortexHook(self.snowflake_conn_id, query_tag=ident.query_tag())
        return CortexRun(hook, ident, chunk_size=self.chunk_size, staging=self.staging, timeout=self.timeout,
                         extra_models=self.extra_models)

    @property
    def _skipping_lines(self) -> bool:
        return self.input_path is not None and self.invalid_requests == "skip"

    def _invalid_path(self) -> Any:
        """The failure rows of the invalid lines (``invalid_requests="skip"``), read back by ``_finish``."""
        return join_path(join_path(self.output_path, "_cortex"), "invalid.jsonl")

    def _stage(self, run: CortexRun, stage: bool = True) -> RunState:
        if self.input_path is not None:
            return run.stage_file(self.input_path, self.model, stage, invalid_requests=self.invalid_requests,
                                  rejected=self._invalid_path())
        assert self.source_table is not None and self.model
        return run.stage_table(self.source_table, self.model, stage)

    def _recover_run(self, context: Context) -> RunState:
        """The run's state, found again from the input and the statements table. Airflow's ``dag.test()``
        (3.3) resumes a deferred task with the trigger event only, dropping the ``kwargs`` given to ``defer``."""
        self.log.warning("Resumed without the deferral's kwargs; finding the run's tables again")
        run = self._run(context)
        try:
            return run.find(self._stage(run, stage=False))
        finally:
            run.close()

    def execute(self, context: Context) -> dict[str, Any]:
        self.claim_output(context)
        run = self._run(context)
        try:
            state = run.submit(self._stage(run))
        finally:
            run.close()
        self._query_ids = state.query_ids
        if state.query_ids and self.deferrable:
            self.defer(
                trigger=CortexStatementTrigger(self.snowflake_conn_id, state.query_ids, self.poll_interval,
                                               end_time=state.end_time),
                method_name="execute_complete",
                kwargs={"run": state.as_dict()},
                timeout=timedelta(seconds=max(state.end_time - time.time(), 0) + 600),
            )
        if not state.query_ids:
            return self._finish(context, state, {})
        run = self._run(context)
        try:
            statuses, timed_out = run.wait(state.query_ids, state.end_time, self.poll_interval)
            if timed_out:
                run.cancel([q for q, s in statuses.items() if s["state"] == "running"])
        finally:
            run.close()
        if timed_out:
            self._finish(context, state, statuses, raise_on_failures=False)
            raise BatchTimeoutError(f"Cortex statements still running at the deadline; cancelled: {state.query_ids}")
        return self._finish(context, state, statuses)

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None,
                         run: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: read the answers back, or cancel at the deadline."""
        event = validate_event(event, CortexStatementTrigger.event_key)
        state = RunState.from_dict(run) if run else self._recover_run(context)
        if event["status"] == "error":
            raise TriggerEventError(f"Polling the Cortex statements failed: {event.get('message')}. The statements "
                                    "keep running; a retry re-attaches to them and submits nothing they cover.")
        statements = dict(event.get("statements") or {})
        if event["status"] == "timeout":
            cortex_run = self._run(context)
            try:
                cortex_run.cancel([q for q, s in statements.items() if s.get("state") == "running"])
            finally:
                cortex_run.close()
            self._finish(context, state, statements, raise_on_failures=False)
            raise BatchTimeoutError(str(event.get("message")))
        return self._finish(context, state, statements)

    def on_kill(self) -> None:
        """Cancel the statements this worker is waiting for (the trigger cancels them when deferred)."""
        if self._query_ids:
            hook = CortexHook(self.snowflake_conn_id)
            try:
                for qid in self._query_ids:
                    try:
                        hook.cancel_statement(qid)
                    except Exception as exc:
                        self.log.warning("Cancelling statement %s failed: %s", qid, exc)
            finally:
                hook.close()

    def _finish(self, context: Context, state: RunState, statuses: Mapping[str, Any],
                raise_on_failures: bool = True) -> dict[str, Any]:
        ti = context["ti"]
        run = self._run(context)
        try:
            outcome = run.finish(state, statuses, self.output_path, max_failed_ratio=self.max_failed_ratio,
                                 keep_staging_tables=self.keep_staging_tables, checks=self.checks,
                                 invalid=self._invalid_path() if self._skipping_lines else None,
                                 try_number=ti.try_number,
                                 dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id, map_index=ti.map_index)
        finally:
            run.close()
        self.publish_manifest(context, outcome.manifest)
        if not outcome.ok and raise_on_failures:
            raise BatchFailedError(outcome.message)
        return outcome.manifest


class CortexStagingCleanupOperator(BaseOperator):
    """Drop the staging tables that Cortex runs left in Snowflake, older than N days, or those of one run.

    :class:`CortexBatchOperator` keeps a run's three staging tables after a failure, so that a retry resumes
    without paying twice; a run nobody retries leaves them behind, prompts and answers included. This drops,
    per run, only tables named ``<table_prefix>_<16 hex>_{REQUESTS,RESULTS,STATEMENTS}`` that carry this
    provider's comment, never another table, and never those of a run whose statements may still be running
    (one reported running, or an intent younger than ``SETTLE_S``). Returns a report: the runs found (with the
    dag_id, task_id, run_id and model their comment names), the ones dropped, those kept and why. Fails (after
    dropping what it could) when some tables could not be dropped.

    Choose ``older_than_days`` longer than your longest run, retries included: a retry resumes from the tables.

    .. seealso:: :ref:`howto/operator:CortexStagingCleanupOperator`

    :param older_than_days: drop the tables of runs created more than this many days ago (fractions allowed;
        ``0``: every run). Required unless ``run_prefix`` is given.
    :param run_prefix: only this run's tables: its prefix ``<table_prefix>_<16 hex>``, as the report, a failed
        run's error message and ``airflow-synth cortex-staging`` name it.
    :param snowflake_conn_id: the Snowflake connection.
    :param database: the staging database (default: the connection's).
    :param schema: the staging schema (default: every schema of the database).
    :param table_prefix: the ``table_prefix`` of the runs' ``CortexStaging``.
    :param dry_run: log and return what would be dropped, drop nothing.
    """

    template_fields: Sequence[str] = ("snowflake_conn_id", "database", "schema", "run_prefix")
    ui_color = "#f0e6d7"

    def __init__(
        self,
        *,
        older_than_days: float | None = None,
        run_prefix: str | None = None,
        snowflake_conn_id: str = "snowflake_default",
        database: str | None = None,
        schema: str | None = None,
        table_prefix: str = "SYNTH_CORTEX",
        dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if older_than_days is None and not run_prefix:
            raise ValueError("give older_than_days or run_prefix (older_than_days=0 drops every finished run)")
        if older_than_days is not None and (isinstance(older_than_days, bool)
                                            or not isinstance(older_than_days, int | float)
                                            or not older_than_days >= 0):
            raise ValueError(f"older_than_days must be a number >= 0, got {older_than_days!r}")
        self.older_than_days = None if older_than_days is None else float(older_than_days)
        self.run_prefix = run_prefix
        self.snowflake_conn_id = snowflake_conn_id
        self.database = database
        self.schema = schema
        self.table_prefix = table_prefix
        # not ``self.dry_run``: that name is BaseOperator's method
        self.is_dry_run = dry_run

    def execute(self, context: Context) -> dict[str, Any]:
        hook = CortexHook(self.snowflake_conn_id)
        try:
            report = staging_report(hook, database=self.database or None, schema=self.schema or None,
                                    table_prefix=self.table_prefix, older_than_days=self.older_than_days,
                                    prefixes=[self.run_prefix] if self.run_prefix else [], drop=True,
                                    dry_run=self.is_dry_run)
        finally:
            hook.close()
        for line in staging_report_text(report):
            self.log.info("%s", line)
        if report["not_found"]:
            self.log.warning("No staging tables of run(s) %s (dropped already?)", ", ".join(report["not_found"]))
        if report["errors"]:
            first = "; ".join(f"{e['prefix']}: {e['error']}" for e in report["errors"][:5])
            raise SynthError(f"could not drop the tables of {len(report['errors'])} run(s) ({first}); those of "
                             f"{len(report['dropped'])} other(s) were dropped. Run again to retry.")
        return {"snowflake_conn_id": self.snowflake_conn_id, "database": self.database, "schema": self.schema,
                "table_prefix": self.table_prefix, **report}
