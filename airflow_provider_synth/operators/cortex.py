"""Batch synthesis with Snowflake Cortex: one set-based ``AI_COMPLETE`` statement per chunk of a staged table."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk import BaseOperator

from airflow_provider_synth.batch import cortex
from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.cortex_sql import StagingTables, TableSource, run_key
from airflow_provider_synth.batch.errors import InvalidRequestsError, Problem
from airflow_provider_synth.batch.jsonl import dumps, open_path
from airflow_provider_synth.batch.manifest import build_manifest, output_paths, write_manifest
from airflow_provider_synth.batch.merge import Accounting, ShardOutputs, merge_shard
from airflow_provider_synth.batch.results import error_line, success_line
from airflow_provider_synth.exceptions import BatchFailedError, BatchTimeoutError, TriggerEventError
from airflow_provider_synth.hooks.cortex import CortexHook
from airflow_provider_synth.operators._native import ManifestPublisherMixin
from airflow_provider_synth.triggers.cortex import CortexStatementTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Rows merged at a time when reading answers back (bounds memory, whatever the run's size).
READ_BLOCK_ROWS = 10_000


@dataclass(frozen=True)
class CortexStaging:
    """Where the run's tables live. They are named ``<table_prefix>_<key>_{REQUESTS,RESULTS,STATEMENTS}``; the
    key comes from dag_id, task_id, run_id, map_index, the input and the model, so a retry finds them again.

    :param database: staging database (default: the connection's).
    :param schema: staging schema (default: the connection's).
    :param table_prefix: table name prefix.
    """

    database: str | None = None
    schema: str | None = None
    table_prefix: str = "SYNTH_CORTEX"


class CortexBatchOperator(ManifestPublisherMixin, BaseOperator):
    """Answer a batch of chat requests with Snowflake Cortex, inside the warehouse, and write the output folder.

    The requests (an OpenAI-format chat JSONL file, or an existing table) are validated, then staged into a
    table keyed by custom_id. Each chunk of ``chunk_size`` rows (by input order) is answered by ONE asynchronous
    ``INSERT ... SELECT AI_COMPLETE(...)`` that skips rows already answered, so a retried or resumed task never
    pays twice; per-row errors come back as data and become failures. The task defers while the statements run
    (or polls, when not deferrable), then reads the answers back in input order into ``results.jsonl``,
    ``failures.jsonl`` and ``manifest.json`` under ``output_path`` and returns the manifest.

    .. seealso::
        :ref:`howto/operator:CortexBatchOperator`

    :param output_path: the output folder (local path, URL or ObjectStoragePath).
    :param input_path: an OpenAI-format ``/v1/chat/completions`` JSONL file; or
    :param source_table: an existing table of prompts or conversations (:class:`TableSource`).
    :param model: the Cortex model; default: the model the requests name.
    :param snowflake_conn_id: the Snowflake connection.
    :param chunk_size: rows per statement: bounds one statement's time and blast radius.
    :param staging: where the staging tables go (:class:`CortexStaging`).
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
        self._query_ids: list[str] = []

    # -- preparing -------------------------------------------------------------------------------------

    def _query_tag(self, context: Context) -> str:
        ti = context["ti"]
        return json.dumps({"app": "airflow-provider-synth", "backend": "cortex", "dag_id": ti.dag_id,
                           "task_id": ti.task_id, "run_id": ti.run_id, "map_index": ti.map_index,
                           "try_number": ti.try_number})

    def _hook(self, context: Context) -> CortexHook:
        return CortexHook(self.snowflake_conn_id, query_tag=self._query_tag(context))

    def _tables(self, context: Context, fingerprint: str, model: str) -> StagingTables:
        ti = context["ti"]
        key = run_key(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, fingerprint, model)
        return StagingTables(self.staging.database, self.staging.schema, f"{self.staging.table_prefix}_{key}")

    def _stage_file(self, hook: CortexHook, context: Context, stage: bool = True) -> tuple[StagingTables, str, int]:
        """Validate the JSONL (nothing runs in Snowflake before it passes), then bulk-load it unless an earlier
        try already did (``stage=False``: only find the run's tables)."""
        check = cortex.check_requests(self.input_path)
        try:
            model = cortex.check_model(self.model or check.model, self.extra_models)
        except ValueError as exc:
            raise InvalidRequestsError([Problem(str(self.input_path), 0, None, str(exc))]) from None
        tables = self._tables(context, check.fingerprint, model)
        if not stage:
            return tables, model, check.total
        hook.run_statements(tables.create())
        if hook.fetch_all(tables.count_requests())[0][0] != check.total:
            hook.run_statements([tables.truncate_requests()])
            rows = (cortex.staging_row(seq, call) for seq, call in cortex.iter_calls(self.input_path))
            written = hook.bulk_write(tables, rows)
            self.log.info("Staged %d requests into %s", written, tables.requests)
        return tables, model, check.total

    def _stage_table(self, hook: CortexHook, context: Context, stage: bool = True) -> tuple[StagingTables, str, int]:
        """Check the source table's ids and prompts in Snowflake, then copy it server-side into staging."""
        src = self.source_table
        assert src is not None and self.model
        model = cortex.check_model(self.model, self.extra_models)
        params, rf = cortex.table_parameters(src.params, conversation=src.messages_column is not None)
        counts_sql, dups_sql = src.checks()
        rows, null_ids, empty = hook.fetch_all(counts_sql)[0]
        counts = {"rows": int(rows), "null_ids": int(null_ids), "empty_inputs": int(empty or 0)}
        cortex.table_problems(src.table, counts, [(r[0], int(r[1])) for r in hook.fetch_all(dups_sql)])
        fingerprint = json.dumps([asdict(src) | {"params": dict(src.params)}, counts["rows"]], sort_keys=True)
        tables = self._tables(context, fingerprint, model)
        if not stage:
            return tables, model, counts["rows"]
        hook.run_statements(tables.create())
        if hook.fetch_all(tables.count_requests())[0][0] != counts["rows"]:
            hook.run_statements([tables.truncate_requests(), src.stage(tables, params, rf)])
        return tables, model, counts["rows"]

    # -- running ---------------------------------------------------------------------------------------

    def _submit(self, hook: CortexHook, tables: StagingTables, model: str, try_number: int) -> tuple[list[str], float]:
        """Re-attach to statements of an earlier try that still run; submit one statement per chunk that still
        has unanswered rows. Returns the query ids to wait for and the run's first submission time."""
        recorded = hook.fetch_all(tables.recorded_statements())
        latest = {int(chunk): str(qid) for chunk, qid, _ in recorded}
        first = min((float(t) for _, _, t in recorded), default=time.time())
        waiting: list[str] = []
        for chunk, _count in hook.fetch_all(tables.pending_chunks(self.chunk_size)):
            chunk = int(chunk)
            qid = latest.get(chunk)
            if qid is not None and hook.get_statement_status(qid).state == "running":
                self.log.info("Chunk %d: re-attaching to statement %s of an earlier try", chunk, qid)
                waiting.append(qid)
                continue
            qid = hook.submit(tables.complete_chunk(model, chunk, self.chunk_size))
            hook.run_statements([tables.record_statement(chunk, qid, try_number, time.time())])
            self.log.info("Chunk %d: submitted statement %s", chunk, qid)
            waiting.append(qid)
        return waiting, first

    def _stage(self, hook: CortexHook, context: Context, stage: bool = True) -> tuple[StagingTables, str, int]:
        if self.input_path is not None:
            return self._stage_file(hook, context, stage)
        return self._stage_table(hook, context, stage)

    def _recover_run(self, context: Context) -> dict[str, Any]:
        """The run's state, found again from the input and the statements table. Airflow's ``dag.test()``
        (3.3) resumes a deferred task with the trigger event only, dropping the ``kwargs`` given to ``defer``."""
        self.log.warning("Resumed without the deferral's kwargs; finding the run's tables again")
        hook = self._hook(context)
        try:
            tables, model, total = self._stage(hook, context, stage=False)
            recorded = hook.fetch_all(tables.recorded_statements())
        finally:
            hook.close()
        first = min((float(t) for _, _, t in recorded), default=time.time())
        return {"tables": asdict(tables), "model": model, "total": total,
                "query_ids": [str(q) for _, q, _ in recorded], "end_time": first + self.timeout}

    def execute(self, context: Context) -> dict[str, Any]:
        hook = self._hook(context)
        try:
            tables, model, total = self._stage(hook, context)
            self._query_ids, first = self._submit(hook, tables, model, context["ti"].try_number)
        finally:
            hook.close()
        end_time = first + self.timeout
        run: dict[str, Any] = {"tables": asdict(tables), "model": model, "total": total,
                               "query_ids": self._query_ids, "end_time": end_time}
        if self._query_ids and self.deferrable:
            self.defer(
                trigger=CortexStatementTrigger(self.snowflake_conn_id, self._query_ids, self.poll_interval,
                                               end_time=end_time),
                method_name="execute_complete",
                kwargs={"run": run},
                timeout=timedelta(seconds=max(end_time - time.time(), 0) + 600),
            )
        statuses = self._wait(context, run) if self._query_ids else {}
        return self._finish(context, run, statuses)

    def _wait(self, context: Context, run: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """Poll in the worker (not deferrable) until every statement finished; cancel them at the deadline."""
        hook = self._hook(context)
        try:
            states: dict[str, dict[str, str]] = {}
            while True:
                for qid in run["query_ids"]:
                    if states.get(qid, {}).get("state") in (None, "running"):
                        states[qid] = hook.get_statement_status(qid).as_dict()
                if all(s["state"] != "running" for s in states.values()):
                    return states
                if time.time() >= run["end_time"]:
                    self._cancel(hook, [q for q, s in states.items() if s["state"] == "running"])
                    self._finish(context, run, states, raise_on_failures=False)
                    raise BatchTimeoutError(f"Cortex statements still running at the deadline; cancelled: "
                                            f"{run['query_ids']}")
                time.sleep(min(self.poll_interval, max(run["end_time"] - time.time(), 0.0)))
        finally:
            hook.close()

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None,
                         run: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: read the answers back, or cancel at the deadline."""
        if not event or event.get("status") not in ("success", "error", "timeout"):
            raise TriggerEventError(f"CortexStatementTrigger sent an unusable event: {event!r}")
        run = run or self._recover_run(context)
        if event["status"] == "error":
            raise TriggerEventError(f"Polling the Cortex statements failed: {event.get('message')}. A retry "
                                    "re-attaches to statements still running.")
        statements = dict(event.get("statements") or {})
        if event["status"] == "timeout":
            hook = self._hook(context)
            try:
                self._cancel(hook, [q for q, s in statements.items() if s.get("state") == "running"])
            finally:
                hook.close()
            self._finish(context, run, statements, raise_on_failures=False)
            raise BatchTimeoutError(str(event.get("message")))
        return self._finish(context, run, statements)

    def _cancel(self, hook: CortexHook, query_ids: Sequence[str]) -> None:
        for qid in query_ids:
            try:
                hook.cancel_statement(qid)
                self.log.info("Cancelled statement %s", qid)
            except Exception as exc:
                self.log.warning("Cancelling statement %s failed: %s", qid, exc)

    def on_kill(self) -> None:
        """Cancel the statements this worker is waiting for (the trigger cancels them when deferred)."""
        if self._query_ids:
            hook = CortexHook(self.snowflake_conn_id)
            try:
                self._cancel(hook, self._query_ids)
            finally:
                hook.close()

    # -- reading back ----------------------------------------------------------------------------------

    def _blocks(self, hook: CortexHook, tables: StagingTables, model: str) -> Iterator[ShardOutputs]:
        """The answers in input order, as shards of at most READ_BLOCK_ROWS for the core's merge."""
        ids, outs, n = io.BytesIO(), io.BytesIO(), 0
        for custom_id, answered, output in hook.iter_rows(tables.read_back()):
            answer = cortex.classify_row(custom_id, bool(answered), output, model)
            ids.write(dumps({"custom_id": custom_id}) + b"\n")
            if answer.body is not None:
                outs.write(success_line(custom_id, answer.body, request_id=answer.body["id"]) + b"\n")
            elif answer.error is not None and not answer.missing:
                outs.write(error_line(custom_id, *answer.error) + b"\n")
            n += 1
            if n == READ_BLOCK_ROWS:
                yield _shard(ids, outs)
                ids, outs, n = io.BytesIO(), io.BytesIO(), 0
        if n:
            yield _shard(ids, outs)

    def _finish(self, context: Context, run: Mapping[str, Any], statuses: Mapping[str, Any],
                raise_on_failures: bool = True) -> dict[str, Any]:
        tables = StagingTables(**run["tables"])
        paths = output_paths(self.output_path)
        acct = Accounting()
        checker = self.checks.checker() if self.checks is not None else None
        hook = self._hook(context)
        try:
            with open_path(paths["results_path"], "wb") as results, open_path(paths["failures_path"], "wb") as failures:
                for shard in self._blocks(hook, tables, run["model"]):
                    merge_shard(shard, results, failures, acct, checker)
            acct.check()
            query_ids = [str(q) for _, q, _ in hook.fetch_all(tables.recorded_statements())]
            failed_ratio = (acct.failed + acct.missing) / acct.total if acct.total else 0.0
            ok = failed_ratio <= self.max_failed_ratio
            if ok and not self.keep_staging_tables:
                hook.run_statements(tables.drop())
        finally:
            hook.close()
        manifest = self._manifest(context, run, query_ids, statuses, acct)
        write_manifest(self.output_path, manifest)
        self.publish_manifest(context, manifest)
        self.log.info("Cortex batch: %d succeeded, %d failed, %d missing of %d", acct.succeeded, acct.failed,
                      acct.missing, acct.total)
        if not ok and raise_on_failures:
            raise BatchFailedError(
                f"{acct.failed + acct.missing} of {acct.total} requests failed or are missing ({failed_ratio:.1%} "
                f"> max_failed_ratio {self.max_failed_ratio:.1%}); see {paths['failures_path']}. The staging "
                "tables are kept: a retry answers only the missing rows."
            )
        return manifest

    def _manifest(self, context: Context, run: Mapping[str, Any], query_ids: list[str],
                  statuses: Mapping[str, Any], acct: Accounting) -> dict[str, Any]:
        """The manifest: ``query_ids`` holds every statement of the run (all tries), ``statements`` the final
        state of those this try waited for."""
        ti = context["ti"]
        tables = StagingTables(**run["tables"])
        return build_manifest(
            backend="cortex", accounting=acct.as_dict(), output_dir=self.output_path,
            model=run["model"], query_ids=query_ids, statements=dict(statuses),
            cost_usd=None, chunk_size=self.chunk_size,
            staging_tables={"requests": tables.requests, "results": tables.results,
                            "statements": tables.statements},
            try_number=ti.try_number, dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
            map_index=ti.map_index,
        )


def _shard(ids: io.BytesIO, outs: io.BytesIO) -> ShardOutputs:
    id_bytes, out_bytes = ids.getvalue(), outs.getvalue()
    return ShardOutputs(requests=lambda: io.BytesIO(id_bytes), outputs=[lambda: io.BytesIO(out_bytes)])
