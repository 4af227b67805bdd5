"""One Snowflake Cortex batch run: stage, submit, attach after a crash, wait, read back, clean up.

A run is one task's input staged in three tables named from the run's key (dag_id, task_id, run_id,
map_index, the input's fingerprint, the model): the requests, the answers, and the statements. Each chunk of
rows is answered by ONE asynchronous ``INSERT ... SELECT AI_COMPLETE(...)``.

**No blind window between a submit and its record.** Before a chunk's statement is submitted, an *intent* is
written to the statements table: a random token, the chunk, the submitting session (``CURRENT_SESSION()``)
and the query tag the statement will carry (the token is in it). Then the statement is submitted with that
``QUERY_TAG``, and its query id is written next to the intent. A retry reconciles every intent that has no
query id BEFORE it submits anything: it asks ``INFORMATION_SCHEMA.QUERY_HISTORY_BY_SESSION`` of the intent's
session for the statement carrying the token (running or finished). Found: the query id is recorded and the
retry re-attaches to it (or, finished, reads its rows). Not found once the intent is older than
:data:`SETTLE_S`: the submit never reached Snowflake and the intent is dropped. Younger: the retry waits.
So the worker may die at any point of a submit, or the record may fail, and no chunk is submitted twice.

**Defence in depth.** Should two statements ever answer the same rows (a zombie worker still submitting
while its retry runs), the read-back keeps the first answer per custom_id and reports the rest as
``answered_twice``; the accounting invariant still holds.

This module holds no Airflow context: operators and the CLI drive it.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_provider_synth.batch.errors import InvalidRequestsError, Problem
from airflow_provider_synth.batch.jsonl import dumps
from airflow_provider_synth.batch.manifest import build_manifest, output_paths, write_manifest
from airflow_provider_synth.batch.merge import Accounting, ShardOutputs, add_invalid, merge_shard
from airflow_provider_synth.batch.paths import open_path
from airflow_provider_synth.batch.results import error_line, success_line
from airflow_provider_synth.batch.status import STATEMENT_PHASES, STATEMENTS, Next, PollError, verdict
from airflow_provider_synth.batch.validate import InvalidRequests, skipped_summary
from airflow_provider_synth.exceptions import BatchFailedError
from airflow_provider_synth.hooks.cortex import is_transient
from airflow_provider_synth.runs import cortex_mapping as cortex
from airflow_provider_synth.runs.cortex_sql import (
    STAGING_COMMENT,
    TABLE_SUFFIXES,
    StagingTables,
    TableSource,
    run_key,
)

if TYPE_CHECKING:
    from airflow_provider_synth.batch.checks import OutputChecks
    from airflow_provider_synth.hooks.cortex import CortexHook, StatementStatus

log = logging.getLogger(__name__)

APP = "airflow-provider-synth"
#: Rows merged at a time when reading answers back (bounds memory, whatever the run's size).
READ_BLOCK_ROWS = 10_000
#: Seconds after which an intent whose statement is not in its session's query history is taken as never
#: submitted. A dying worker's last request reaches Snowflake within its network timeouts or never; Airflow
#: retries a task minutes later (``retry_delay``), so a retry rarely has to wait for this.
SETTLE_S = 120.0
#: Status polls in a row that may fail (network, throttling) before the worker-side wait gives up.
MAX_POLL_ERRORS = 5


def _now() -> float:
    return time.time()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


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


@dataclass(frozen=True)
class RunIdentity:
    """Who runs: the task instance (its try number marks the statements it submits)."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int = 1

    def query_tag(self, **extra: Any) -> str:
        """The ``QUERY_TAG`` JSON of the run's statements, with ``extra`` keys (chunk, intent...)."""
        return json.dumps({"app": APP, "backend": "cortex", "dag_id": self.dag_id, "task_id": self.task_id,
                           "run_id": self.run_id, "map_index": self.map_index, "try_number": self.try_number,
                           **extra})


@dataclass
class RunState:
    """What a task carries from the submit to the read-back (the deferral's kwargs: JSON primitives only).

    :param tables: the run's staging tables.
    :param model: the Cortex model.
    :param total: number of requests.
    :param query_ids: the statements this try waits for.
    :param end_time: the run's deadline (epoch seconds), anchored at its first submission.
    """

    tables: StagingTables
    model: str
    total: int
    query_ids: list[str] = field(default_factory=list)
    end_time: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"tables": asdict(self.tables), "model": self.model, "total": self.total,
                "query_ids": list(self.query_ids), "end_time": self.end_time}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunState:
        return cls(StagingTables(**data["tables"]), str(data["model"]), int(data["total"]),
                   [str(q) for q in data.get("query_ids") or []], float(data.get("end_time") or 0.0))


@dataclass
class Outcome:
    """A finished read-back: the manifest, and whether the run is within ``max_failed_ratio``."""

    manifest: dict[str, Any]
    ok: bool
    message: str


@dataclass
class _Intent:
    intent: str
    chunk: int
    session_id: str
    submitted_at: float


class CortexRun:
    """Drive one run through a :class:`~airflow_provider_synth.hooks.cortex.CortexHook`.

    :param hook: the hook (its connection is opened on first use; :meth:`close` closes it).
    :param ident: the task instance.
    :param chunk_size: rows per statement.
    :param staging: where the tables live.
    :param timeout: seconds the statements may run, counted from the run's first submission.
    :param extra_models: model names to accept beyond the known Cortex models.
    """

    def __init__(self, hook: CortexHook, ident: RunIdentity, *, chunk_size: int = 1_000,
                 staging: CortexStaging | None = None, timeout: float = 6 * 3600.0,
                 extra_models: frozenset[str] = frozenset()) -> None:
        self.hook = hook
        self.ident = ident
        self.chunk_size = int(chunk_size)
        self.staging = staging or CortexStaging()
        self.timeout = float(timeout)
        self.extra_models = extra_models
        #: what the last :meth:`submit` did, for the logs and the manifest
        self.counts = {"submitted": 0, "reattached": 0, "recovered": 0, "never_submitted": 0}

    def close(self) -> None:
        self.hook.close()

    # -- staging ---------------------------------------------------------------------------------------

    def _tables(self, fingerprint: str, model: str) -> StagingTables:
        i = self.ident
        key = run_key(i.dag_id, i.task_id, i.run_id, i.map_index, fingerprint, model)
        return StagingTables(self.staging.database, self.staging.schema, f"{self.staging.table_prefix}_{key}")

    def _comment(self, model: str) -> str:
        i = self.ident
        return STAGING_COMMENT + " " + json.dumps({"dag_id": i.dag_id, "task_id": i.task_id, "run_id": i.run_id,
                                                   "map_index": i.map_index, "model": model,
                                                   "created_at": round(_now(), 3)})

    def stage_file(self, input_path: Any, model: str | None, stage: bool = True, *,
                   invalid_requests: InvalidRequests = "fail", rejected: Any = None) -> RunState:
        """Validate the JSONL (nothing runs in Snowflake before it passes), then bulk-load it unless an earlier
        try already did (``stage=False``: only find the run's tables). ``invalid_requests="skip"``: only the
        valid lines are staged; the invalid ones become failure rows in ``rejected`` (see :meth:`finish`)."""
        check = cortex.check_requests(input_path, invalid_requests=invalid_requests,
                                      open_rejected=lambda: open_path(rejected, "wb"))
        if check.invalid_lines and stage:
            log.warning(skipped_summary(len(check.invalid_lines), check.synthetic_ids, "failures.jsonl"))
        try:
            model = cortex.check_model(model or check.model, self.extra_models)
        except ValueError as exc:
            raise InvalidRequestsError([Problem(str(input_path), 0, None, str(exc))]) from None
        tables = self._tables(check.fingerprint, model)
        if stage:
            self.hook.run_statements(tables.create(self._comment(model)))
            if self.hook.fetch_all(tables.count_requests())[0][0] != check.staged:
                self.hook.run_statements([tables.truncate_requests()])
                rows = (cortex.staging_row(seq, call)
                        for seq, call in cortex.iter_calls(input_path, check.invalid_lines))
                written = self.hook.bulk_write(tables.plain_names(), rows)
                log.info("Staged %d requests into %s", written, tables.requests)
        return RunState(tables, model, check.total)

    def stage_table(self, src: TableSource, model: str, stage: bool = True) -> RunState:
        """Check the source table's ids and prompts in Snowflake, then copy it server-side into staging."""
        model = cortex.check_model(model, self.extra_models)
        params, rf = cortex.table_parameters(src.params, conversation=src.messages_column is not None)
        counts_sql, dups_sql = src.checks()
        rows, null_ids, empty = self.hook.fetch_all(counts_sql)[0]
        counts = {"rows": int(rows), "null_ids": int(null_ids), "empty_inputs": int(empty or 0)}
        cortex.table_problems(src.table, counts, [(r[0], int(r[1])) for r in self.hook.fetch_all(dups_sql)])
        fingerprint = json.dumps([asdict(src) | {"params": dict(src.params)}, counts["rows"]], sort_keys=True)
        tables = self._tables(fingerprint, model)
        if stage:
            self.hook.run_statements(tables.create(self._comment(model)))
            if self.hook.fetch_all(tables.count_requests())[0][0] != counts["rows"]:
                self.hook.run_statements([tables.truncate_requests(), src.stage(tables, params, rf)])
        return RunState(tables, model, counts["rows"])

    # -- submitting and re-attaching --------------------------------------------------------------------

    def reconcile(self, tables: StagingTables) -> None:
        """Give every intent without a query id its statement, looked up in its session's query history, or
        drop it once settled and not found. Waits while an intent is younger than :data:`SETTLE_S` and its
        statement is not visible yet. A failing lookup raises: nothing is submitted blind."""
        while True:
            intents = [_Intent(str(i), int(c), str(s), float(t))
                       for i, c, s, t in self.hook.fetch_all(tables.open_intents())]
            if not intents:
                return
            in_doubt = [it for it in intents if not self._settle(tables, it)]
            if not in_doubt:
                return
            wait = max(1.0, min(SETTLE_S - (_now() - it.submitted_at) for it in in_doubt))
            log.warning("%d statement(s) of an earlier try may still reach Snowflake (submitted less than %.0f s "
                        "ago, not in the query history yet); checking again in %.0f s", len(in_doubt), SETTLE_S,
                        wait)
            _sleep(wait)

    def _settle(self, tables: StagingTables, it: _Intent) -> bool:
        """Settle one intent; ``False`` while it is in doubt."""
        history = self.hook.find_statements(it.session_id, tables.prefix, tables.database)
        found = [(qid, status) for qid, tag, status in history if _tag_intent(tag) == it.intent]
        if found:
            query_id, status = found[0]
            self.hook.run_statements([tables.record_query_id(it.intent, query_id)])
            self.counts["recovered"] += 1
            log.warning("Chunk %d: statement %s (%s) of an earlier try found in session %s's query history; its "
                        "record had been lost", it.chunk, query_id, status.state, it.session_id)
            return True
        if _now() - it.submitted_at >= SETTLE_S:
            self.hook.run_statements([tables.forget_intent(it.intent)])
            self.counts["never_submitted"] += 1
            log.info("Chunk %d: the statement intended at %.0f never reached Snowflake", it.chunk, it.submitted_at)
            return True
        return False

    def submit(self, state: RunState) -> RunState:
        """Re-attach to the run's statements that still run; submit one statement per chunk that still has
        unanswered rows and no statement running. Returns the state with the query ids to wait for and the
        deadline (anchored at the run's first submission, whatever the try)."""
        tables = state.tables
        self.reconcile(tables)
        by_chunk: dict[int, list[str]] = {}
        for chunk, qid, _ in self.hook.fetch_all(tables.recorded_statements()):
            by_chunk.setdefault(int(chunk), []).append(str(qid))
        waiting: list[str] = []
        for chunk, _count in self.hook.fetch_all(tables.pending_chunks(self.chunk_size)):
            # a state the verdict does not know is waited on too: the verdict, not this loop, decides on it
            running = [q for q in by_chunk.get(int(chunk), []) if not STATEMENT_PHASES.get(self.status(q).state)]
            if running:
                log.info("Chunk %d: re-attaching to statement(s) %s of an earlier try", chunk, ", ".join(running))
                self.counts["reattached"] += len(running)
                waiting.extend(running)
                continue
            waiting.append(self._submit_chunk(tables, state.model, int(chunk)))
        first = self.hook.fetch_all(tables.first_submission())[0][0]
        first = float(first) if first is not None else _now()
        return RunState(tables, state.model, state.total, waiting, first + self.timeout)

    def _submit_chunk(self, tables: StagingTables, model: str, chunk: int) -> str:
        intent = uuid.uuid4().hex[:16]
        tag = self.ident.query_tag(synth_run=tables.prefix, chunk=chunk, intent=intent)
        self.hook.run_statements([tables.record_intent(chunk, intent, self.ident.try_number, _now(),
                                                       self.hook.session_id, tag)])
        query_id = self.hook.submit(tables.complete_chunk(model, chunk, self.chunk_size), query_tag=tag)
        self.hook.run_statements([tables.record_query_id(intent, query_id)])
        self.counts["submitted"] += 1
        log.info("Chunk %d: submitted statement %s", chunk, query_id)
        return query_id

    def recorded_query_ids(self, tables: StagingTables) -> list[str]:
        """Every statement of the run, all tries, oldest first."""
        return [str(q) for _, q, _ in self.hook.fetch_all(tables.recorded_statements())]

    def find(self, state: RunState) -> RunState:
        """The state of a run whose deferral kwargs were lost, from its tables (``state`` from ``stage_*``)."""
        first = self.hook.fetch_all(state.tables.first_submission())[0][0]
        first = float(first) if first is not None else _now()
        return RunState(state.tables, state.model, state.total, self.recorded_query_ids(state.tables),
                        first + self.timeout)

    # -- waiting ---------------------------------------------------------------------------------------

    def status(self, query_id: str) -> StatementStatus:
        return self.hook.get_statement_status(query_id)

    def wait(self, query_ids: Sequence[str], end_time: float, poll_interval: float
             ) -> tuple[dict[str, dict[str, str]], bool]:
        """Poll in the worker until every statement finished or ``end_time`` passed: ``(statuses, timed_out)``.
        Up to :data:`MAX_POLL_ERRORS` failing polls in a row are waited out (a retry re-attaches after more)."""
        states: dict[str, dict[str, str]] = {q: {"query_id": q, "state": "running", "message": "not polled yet"}
                                             for q in query_ids}
        errors = 0
        while True:
            failure: Exception | None = None
            try:
                for qid in query_ids:
                    if states[qid]["state"] == "running":
                        states[qid] = self.status(qid).as_dict()
                errors = 0
            except Exception as exc:  # the hook classifies it; the verdict decides
                errors, failure = errors + 1, exc
            result = verdict({q: s["state"] for q, s in states.items()}, kind=STATEMENTS,
                             error=PollError.of([is_transient(failure)] if failure is not None else []),
                             last_error=("?", f"{type(failure).__name__}: {failure}") if failure else None,
                             consecutive_errors=errors, max_consecutive_errors=MAX_POLL_ERRORS,
                             end_time=end_time, now=_now())
            if result.next is Next.FAILED and failure is not None:
                raise failure
            if result.next is Next.UNKNOWN:
                raise BatchFailedError(result.message)
            if result.over:
                return states, result.next is Next.TIMEOUT
            if failure is not None:
                log.warning("Polling the statements failed (%d in a row): %s: %s", errors, type(failure).__name__,
                            failure)
            _sleep(min(poll_interval, max(end_time - _now(), 0.0)))

    def cancel(self, query_ids: Sequence[str]) -> None:
        """Cancel statements (``SYSTEM$CANCEL_QUERY``); a failing cancel is logged, not raised."""
        for qid in query_ids:
            try:
                self.hook.cancel_statement(qid)
                log.info("Cancelled statement %s", qid)
            except Exception as exc:
                log.warning("Cancelling statement %s failed: %s", qid, exc)

    # -- reading back ----------------------------------------------------------------------------------

    def _blocks(self, tables: StagingTables, model: str) -> Iterator[ShardOutputs]:
        """The answers in input order, as shards of at most READ_BLOCK_ROWS for the core's merge."""
        ids, outs, n = io.BytesIO(), io.BytesIO(), 0
        for custom_id, answered, output in self.hook.iter_rows(tables.read_back()):
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

    def finish(self, state: RunState, statuses: Mapping[str, Any], output_path: Any, *, max_failed_ratio: float,
               keep_staging_tables: bool, checks: OutputChecks | None = None, invalid: Any = None,
               **fields: Any) -> Outcome:
        """Read every answer back into the output folder, check the accounting, write the manifest, and drop
        the tables after a run within ``max_failed_ratio`` (unless ``keep_staging_tables``).

        :param checks: output checks: unusable answers go to failures with their text, never to results.
        :param invalid: the failure rows of the lines :meth:`stage_file` set aside (``invalid_requests="skip"``).
        :param fields: more manifest keys (try_number, dag_id, task_id, run_id, map_index...).
        """
        tables = state.tables
        paths = output_paths(output_path)
        acct = Accounting()
        checker = checks.checker() if checks is not None else None
        with open_path(paths["results_path"], "wb") as results, open_path(paths["failures_path"], "wb") as failures:
            for shard in self._blocks(tables, state.model):
                merge_shard(shard, results, failures, acct, checker)
            if invalid is not None:
                add_invalid(invalid, failures, acct)
        acct.check()
        twice = int(self.hook.fetch_all(tables.count_answered_twice())[0][0] or 0)
        query_ids = self.recorded_query_ids(tables)
        failed_ratio = (acct.failed + acct.missing) / acct.total if acct.total else 0.0
        ok = failed_ratio <= max_failed_ratio
        if ok and not keep_staging_tables:
            self.hook.run_statements(tables.drop())
        if twice:
            log.warning("%d row(s) were answered by two statements; the first answer of each was kept", twice)
        manifest = build_manifest(
            backend="cortex", accounting=acct.as_dict(), output_dir=output_path, model=state.model,
            query_ids=query_ids, statements=dict(statuses), answered_twice=twice, cost_usd=None,
            chunk_size=self.chunk_size, staging_tables=_table_names(tables), **fields,
        )
        write_manifest(output_path, manifest)
        log.info("Cortex batch: %d succeeded, %d failed, %d missing of %d", acct.succeeded, acct.failed,
                 acct.missing, acct.total)
        message = "" if ok else failure_message(acct, failed_ratio, max_failed_ratio, paths["failures_path"], tables)
        return Outcome(manifest, ok, message)


def failure_message(acct: Accounting, failed_ratio: float, max_failed_ratio: float, failures_path: Any,
                    tables: StagingTables) -> str:
    """Say what failed, what a retry can and cannot change, and where the evidence is."""
    parts = [f"{acct.failed + acct.missing} of {acct.total} requests failed or are missing ({failed_ratio:.1%} > "
             f"max_failed_ratio {max_failed_ratio:.1%}); see {failures_path}."]
    if acct.failed:
        parts.append(f"{acct.failed} got a per-row Cortex error (or an answer the output checks refused): these "
                     "are final, a retry does not ask the model again for them.")
    if acct.missing:
        parts.append(f"{acct.missing} have no answer (their statement failed or was cancelled): a retry answers "
                     "only these.")
    parts.append(f"The staging tables {tables.prefix}_{{{','.join(TABLE_SUFFIXES)}}} are kept; list or drop "
                 "them with `airflow-synth cortex-staging` or on a schedule with CortexStagingCleanupOperator.")
    return " ".join(parts)


def _table_names(tables: StagingTables) -> dict[str, str]:
    return {"requests": tables.requests, "results": tables.results, "statements": tables.statements}


def _tag_intent(tag: str) -> str | None:
    try:
        data = json.loads(tag)
    except ValueError:
        return None
    return str(data["intent"]) if isinstance(data, dict) and data.get("intent") else None


def _shard(ids: io.BytesIO, outs: io.BytesIO) -> ShardOutputs:
    id_bytes, out_bytes = ids.getvalue(), outs.getvalue()
    return ShardOutputs(requests=lambda: io.BytesIO(id_bytes), outputs=[lambda: io.BytesIO(out_bytes)])
