"""Batch synthesis with Snowflake Cortex: one set-based ``AI_COMPLETE`` statement per chunk of a staged table.

The run itself (stage, submit, re-attach after a crash, wait, read back) is
:class:`~airflow_provider_synth.runs.cortex.CortexRun`; :class:`CortexBatchOperator` maps the Airflow context
onto it. :class:`CortexStagingCleanupOperator` drops the staging tables failed runs left, with
:func:`~airflow_provider_synth.runs.cortex_staging.staging_report` (what ``airflow-synth cortex-staging`` runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator

from airflow_provider_synth.batch.paths import join_path
from airflow_provider_synth.batch.validate import InvalidRequests
from airflow_provider_synth.exceptions import SynthError
from airflow_provider_synth.hooks.cortex import CortexHook
from airflow_provider_synth.operators._base import DEFAULT_DEFERRABLE, SynthBatchOperator
from airflow_provider_synth.runs.base import SynthRun
from airflow_provider_synth.runs.cortex import (
    READ_BLOCK_ROWS,
    CortexConfig,
    CortexRun,
    CortexStaging,
    RunState,
    query_tag,
)
from airflow_provider_synth.runs.cortex_sql import TableSource
from airflow_provider_synth.runs.cortex_staging import staging_report, staging_report_text
from airflow_provider_synth.triggers.cortex import CortexStatementTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_synth.batch.checks import OutputChecks

__all__ = ["READ_BLOCK_ROWS", "CortexBatchOperator", "CortexConfig", "CortexStaging",
           "CortexStagingCleanupOperator", "TableSource"]


class CortexBatchOperator(SynthBatchOperator):
    """Answer a batch of chat requests with Snowflake Cortex, inside the warehouse, and write the output folder.

    The requests (an OpenAI-format chat JSONL file, or an existing table) are validated, then staged into a
    table keyed by custom_id. Each chunk of ``config.chunk_size`` rows (by input order) is answered by ONE
    asynchronous ``INSERT ... SELECT AI_COMPLETE(...)`` that skips rows already answered, so a retried or
    resumed task never pays twice; per-row errors come back as data and become failures. The task defers while
    the statements run (or polls, when not deferrable), then reads the answers back in input order into
    ``results.jsonl``, ``failures.jsonl`` and ``manifest.json`` under ``output_path`` and returns the manifest.

    .. seealso::
        :ref:`howto/operator:CortexBatchOperator`

    :param conn_id: the Snowflake connection (``snowflake_conn_id=`` still works, with a ``DeprecationWarning``).
    :param output_path: the output folder (local path, URL or ObjectStoragePath), one per task instance (with
        ``{{ ti.map_index }}`` when mapped: see :mod:`~airflow_provider_synth.batch.claims`).
    :param input_path: an OpenAI-format ``/v1/chat/completions`` JSONL file; or
    :param source_table: an existing table of prompts or conversations (:class:`TableSource`).
    :param model: the Cortex model; default: the model the requests name.
    :param poll_interval: seconds between status polls.
    :param timeout: seconds the statements may run, counted from the first submission; then they are cancelled.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param max_failed_ratio: the share of failed or missing requests tolerated before the task fails.
    :param checks: output checks (:class:`~airflow_provider_synth.batch.checks.OutputChecks`): answers cut off,
        refused or off-schema go to ``failures.jsonl`` with their text, never to results; the manifest counts
        them under ``checks``. (Cortex has no retry rounds: a failed task retry does not re-answer them.)
    :param invalid_requests: ``"fail"`` (default): an invalid line refuses the file before anything runs in
        Snowflake. ``"skip"``: only the valid lines are staged; each invalid one is a failure row in
        ``failures.jsonl``, counted in the manifest's ``invalid`` and against ``max_failed_ratio``.
    :param config: Cortex's own knobs (:class:`CortexConfig`): ``chunk_size``, ``staging``,
        ``keep_staging_tables``, ``extra_models``. Given as keyword arguments of their own they still work, with
        a ``DeprecationWarning``.
    """

    template_fields: Sequence[str] = ("input_path", "output_path", "model")
    ui_color = "#29b5e8"
    config_class = CortexConfig
    trigger_class = CortexStatementTrigger
    default_conn_id = "snowflake_default"
    default_poll_interval = 10.0
    default_timeout = timedelta(hours=6)
    collect_on_timeout = True
    renamed = {"snowflake_conn_id": "conn_id"}
    config: CortexConfig

    def __init__(
        self,
        *,
        conn_id: str = "snowflake_default",
        output_path: Any,
        input_path: Any = None,
        source_table: TableSource | None = None,
        model: str | None = None,
        poll_interval: float = 10.0,
        timeout: timedelta | float = 6 * 3600.0,
        deferrable: bool = DEFAULT_DEFERRABLE,
        max_failed_ratio: float = 0.0,
        checks: OutputChecks | None = None,
        invalid_requests: InvalidRequests = "fail",
        config: CortexConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if (input_path is None) == (source_table is None):
            raise ValueError("set exactly one of input_path and source_table")
        if source_table is not None and not model:
            raise ValueError("model is required with source_table")
        super().__init__(conn_id=conn_id, output_path=output_path, poll_interval=poll_interval, timeout=timeout,
                         deferrable=deferrable, max_failed_ratio=max_failed_ratio, checks=checks,
                         invalid_requests=invalid_requests, config=config, **kwargs)
        self.input_path = input_path
        self.source_table = source_table
        self.model = model

    @property
    def snowflake_conn_id(self) -> str:
        """Deprecated: ``conn_id``."""
        return self.conn_id

    # -- the run -------------------------------------------------------------------------------------------

    def _new_run(self, context: Context) -> CortexRun:
        ident = self.identity(context)
        cfg = self.config
        hook = CortexHook(self.conn_id, query_tag=query_tag(ident))
        return CortexRun(hook, ident, chunk_size=cfg.chunk_size, staging=cfg.staging, timeout=self.timeout_s,
                         extra_models=frozenset(cfg.extra_models), output_path=self.output_path, checks=self.checks,
                         invalid=self._invalid_path() if self._skipping_lines else None,
                         keep_staging_tables=cfg.keep_staging_tables)

    @property
    def _skipping_lines(self) -> bool:
        return self.input_path is not None and self.invalid_requests == "skip"

    def _invalid_path(self) -> Any:
        """The failure rows of the invalid lines (``invalid_requests="skip"``), read back by the collection."""
        return join_path(join_path(self.output_path, "_cortex"), "invalid.jsonl")

    def _stage(self, run: CortexRun, stage: bool = True) -> RunState:
        if self.input_path is not None:
            return run.stage_file(self.input_path, self.model, stage, invalid_requests=self.invalid_requests,
                                  rejected=self._invalid_path())
        assert self.source_table is not None and self.model
        return run.stage_table(self.source_table, self.model, stage)

    def start_run(self, context: Context) -> SynthRun:
        run = self._new_run(context)
        self._stage(run)
        run.attach()
        return run

    def resume_run(self, context: Context, event: Mapping[str, Any], kwargs: Mapping[str, Any]) -> SynthRun:
        run = self._new_run(context)
        saved = kwargs.get("run")
        if saved:
            run.state = RunState.from_dict(saved)
        else:
            # Airflow's dag.test() (3.3) resumes a deferred task with the trigger event only, dropping the
            # kwargs given to defer: the run's state is found again from the input and the statements table
            self.log.warning("Resumed without the deferral's kwargs; finding the run's tables again")
            self._stage(run, stage=False)
        run.refresh(event["statements"])
        return run

    def make_trigger(self, run: SynthRun, end_time: float) -> BaseTrigger:
        return CortexStatementTrigger(self.conn_id, run.running, self.poll_interval_for(run), end_time=end_time)

    def defer_kwargs(self, run: SynthRun) -> dict[str, Any] | None:
        assert isinstance(run, CortexRun)
        state = run._staged()
        state.query_ids, state.end_time = run.running, self.end_time(run)
        return {"run": state.as_dict()}

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None,
                         run: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Resume after the trigger: read the answers back, or cancel at the deadline."""
        return super().execute_complete(context, event, run=run, **kwargs)


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
