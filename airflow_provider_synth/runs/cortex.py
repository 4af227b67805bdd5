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
from airflow_provider_synth.batch.landing import landing
from airflow_provider_synth.batch.manifest import build_manifest, output_paths
from airflow_provider_synth.batch.merge import Accounting, ShardOutputs, add_invalid, merge_shard
from airflow_provider_synth.batch.paths import open_path
from airflow_provider_synth.batch.results import error_line, success_line
from airflow_provider_synth.batch.status import STATEMENTS
from airflow_provider_synth.batch.validate import InvalidRequests, skipped_summary
from airflow_provider_synth.hooks.cortex import is_transient
from airflow_provider_synth.runs import cortex_mapping as cortex
from airflow_provider_synth.runs.base import RunIdentity, SynthRun
from airflow_provider_synth.runs.cortex_sql import (
    STAGING_COMMENT,
    TABLE_SUFFIXES,
    StagingTables,
    TableSource,
)

if TYPE_CHECKING:
    from airflow_provider_synth.batch.checks import OutputChecks
    from airflow_provider_synth.hooks.cortex import CortexHook, StatementStatus

log = logging.getLogger(__name__)

APP = "airflow-provider-synth"
#: the run key's separator (pinned: see :func:`~airflow_provider_synth.runs.cortex_sql.run_key`)
RUN_KEY_SEP = "\x1f"
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


def query_tag(ident: RunIdentity, **extra: Any) -> str:
    """The ``QUERY_TAG`` JSON of a run's statements, with ``extra`` keys (chunk, intent...)."""
    return json.dumps({"app": APP, "backend": "cortex", "dag_id": ident.dag_id, "task_id": ident.task_id,
                       "run_id": ident.run_id, "map_index": ident.map_index, "try_number": ident.try_number,
                       **extra})


@dataclass(frozen=True)
class CortexConfig:
    """Snowflake Cortex's own knobs (everything every backend shares is an operator argument).

    :param chunk_size: rows per statement: bounds one statement's time and blast radius.
    :param staging: where the staging tables go (:class:`CortexStaging`).
    :param keep_staging_tables: keep the tables after a successful run (they are always kept after a failure,
        so that a retry resumes without paying twice).
    :param extra_models: model names to accept beyond the known Cortex models (new or fine-tuned ones).
    """

    chunk_size: int = 1_000
    staging: CortexStaging = field(default_factory=CortexStaging)
    keep_staging_tables: bool = False
    extra_models: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


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


class CortexRun(SynthRun):
    """Drive one run through a :class:`~airflow_provider_synth.hooks.cortex.CortexHook` (the :class:`SynthRun`
    of Snowflake Cortex: it waits for statements, has no retry rounds, and a task retry answers only the rows
    still missing).

    Stage first (:meth:`stage_file` or :meth:`stage_table`: the run's :attr:`state`), then :meth:`attach`,
    :meth:`submit`, wait, :meth:`collect`.

    :param hook: the hook (its connection is opened on first use; :meth:`close` closes it).
    :param ident: the task instance.
    :param chunk_size: rows per statement.
    :param staging: where the tables live.
    :param timeout: seconds the statements may run, counted from the run's first submission.
    :param extra_models: model names to accept beyond the known Cortex models.
    :param output_path: the output folder :meth:`collect` writes.
    :param checks: output checks: unusable answers go to failures with their text, never to results.
    :param invalid: the failure rows of the lines :meth:`stage_file` set aside (``invalid_requests="skip"``).
    :param keep_staging_tables: keep the tables after a run within ``max_failed_ratio`` (:meth:`settle`).
    """

    backend = "cortex"
    waited = STATEMENTS

    def __init__(self, hook: CortexHook, ident: RunIdentity, *, chunk_size: int = 1_000,
                 staging: CortexStaging | None = None, timeout: float = 6 * 3600.0,
                 extra_models: frozenset[str] = frozenset(), output_path: Any = None,
                 checks: OutputChecks | None = None, invalid: Any = None, keep_staging_tables: bool = False) -> None:
        self.hook = hook
        self.ident = ident
        self.chunk_size = int(chunk_size)
        self.staging = staging or CortexStaging()
        self.timeout = float(timeout)
        self.extra_models = extra_models
        self._output_path, self.checks, self.invalid = output_path, checks, invalid
        self.keep_staging_tables = keep_staging_tables
        #: what the last :meth:`submit` did, for the logs and the manifest
        self.counts = {"submitted": 0, "reattached": 0, "recovered": 0, "never_submitted": 0}
        #: the staged run (set by :meth:`stage_file`, :meth:`stage_table`, or given back after a deferral)
        self.state: RunState | None = None
        #: every statement waited for -> ``{"query_id", "state", "message"}``
        self.statements: dict[str, dict[str, str]] = {}
        self._twice = 0

    def close(self) -> None:
        self.hook.close()

    @property
    def output_dir(self) -> Any:
        return self._output_path

    def _staged(self) -> RunState:
        if self.state is None:
            raise RuntimeError("stage the run first (stage_file or stage_table)")
        return self.state

    # -- staging ---------------------------------------------------------------------------------------

    def _tables(self, fingerprint: str, model: str) -> StagingTables:
        key = self.ident.run_key(fingerprint, model, sep=RUN_KEY_SEP, length=16).upper()
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
        valid lines are staged; the invalid ones become failure rows in ``rejected`` (see :meth:`collect`)."""
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
        self.state = RunState(tables, model, check.total)
        return self.state

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
        self.state = RunState(tables, model, counts["rows"])
        return self.state

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

    # -- the run contract --------------------------------------------------------------------------------

    def attach(self) -> None:
        """Settle every intent an earlier try left (nothing is ever submitted blind), then re-attach to every
        statement of the run (any try) still running."""
        tables = self._staged().tables
        self.reconcile(tables)
        for qid in self.recorded_query_ids(tables):
            if qid not in self.statements:
                self.statements[qid] = {"query_id": qid, "state": "running", "message": "not polled yet"}
        errors = self.poll()
        if errors:
            raise errors[0][1]  # nothing may be submitted before it is known what still runs
        # a finished statement's rows are in the tables already: this try waits only for those still running
        self.statements = {q: st for q, st in self.statements.items() if st.get("state") == "running"}

    def submit(self) -> list[str]:
        """Submit one statement per chunk that still has unanswered rows and no statement running (a running
        statement of an earlier try is re-attached to); return the new query ids."""
        state = self._staged()
        tables = state.tables
        by_chunk: dict[int, list[str]] = {}
        for chunk, qid, _ in self.hook.fetch_all(tables.recorded_statements()):
            by_chunk.setdefault(int(chunk), []).append(str(qid))
        created: list[str] = []
        for chunk, _count in self.hook.fetch_all(tables.pending_chunks(self.chunk_size)):
            # a state no table knows is waited on too (the verdict stops on it): never submitted again
            running = [q for q in by_chunk.get(int(chunk), []) if q in self.running]
            if running:
                log.info("Chunk %d: re-attaching to statement(s) %s of an earlier try", chunk, ", ".join(running))
                self.counts["reattached"] += len(running)
                continue
            qid = self._submit_chunk(tables, state.model, int(chunk))
            self.statements[qid] = {"query_id": qid, "state": "running", "message": "submitted"}
            created.append(qid)
        state.query_ids = self.running
        if state.query_ids:
            state.end_time = (self.started_at or _now()) + self.timeout
        return created

    def states(self) -> dict[str, str | None]:
        return {q: s.get("state") for q, s in self.statements.items()}

    def poll(self) -> list[tuple[str, BaseException]]:
        errors: list[tuple[str, BaseException]] = []
        for qid in self.running:
            try:
                self.statements[qid] = self.status(qid).as_dict()
            except Exception as exc:  # the hook classifies it (is_transient); the verdict decides
                errors.append((qid, exc))
                if not is_transient(exc):
                    break  # a revoked grant answers every statement alike: the verdict fails the wait at once
        return errors

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    def refresh(self, statements: Mapping[str, Mapping[str, Any]]) -> None:
        """Take the statements' states from a trigger event."""
        for qid, st in statements.items():
            self.statements[str(qid)] = {k: str(v) for k, v in st.items()}

    @property
    def started_at(self) -> float | None:
        first = self.hook.fetch_all(self._staged().tables.first_submission())[0][0]
        return float(first) if first is not None else None

    def collect(self) -> Accounting:
        """Read every answer back, in input order, into the output folder; the accounting is checked."""
        state = self._staged()
        paths = output_paths(self._output_path)
        acct = Accounting()
        checker = self.checks.checker() if self.checks is not None else None
        with landing(paths["results_path"]) as results, landing(paths["failures_path"]) as failures:
            for shard in self._blocks(state.tables, state.model):
                merge_shard(shard, results, failures, acct, checker)
            if self.invalid is not None:
                add_invalid(self.invalid, failures, acct)
        acct.check()
        self._twice = int(self.hook.fetch_all(state.tables.count_answered_twice())[0][0] or 0)
        if self._twice:
            log.warning("%d row(s) were answered by two statements; the first answer of each was kept", self._twice)
        return acct

    def manifest(self, acct: Accounting | None, status: str, **fields: Any) -> dict[str, Any]:
        state = self._staged()
        return build_manifest(
            backend=self.backend, accounting=acct.as_dict() if acct is not None else {"total": state.total},
            output_dir=self._output_path, status=status, model=state.model,
            query_ids=self.recorded_query_ids(state.tables), statements=dict(self.statements),
            answered_twice=self._twice, cost_usd=None, chunk_size=self.chunk_size,
            staging_tables=_table_names(state.tables), **fields,
        )

    def failure_hints(self, acct: Accounting) -> list[str]:
        return failure_hints(acct, self._staged().tables)

    def settle(self, ok: bool) -> None:
        """Drop the staging tables after a run within ``max_failed_ratio`` (unless ``keep_staging_tables``);
        after one that is not, keep them: a retry answers only the rows still missing."""
        if ok and not self.keep_staging_tables:
            self.hook.run_statements(self._staged().tables.drop())

    def cancel(self) -> list[str]:
        """Cancel the statements still running (``SYSTEM$CANCEL_QUERY``); a failing cancel is logged."""
        cancelled = []
        for qid in self.running:
            try:
                self.hook.cancel_statement(qid)
                cancelled.append(qid)
                log.info("Cancelled statement %s", qid)
            except Exception as exc:
                log.warning("Cancelling statement %s failed: %s", qid, exc)
        return cancelled

    def _submit_chunk(self, tables: StagingTables, model: str, chunk: int) -> str:
        intent = uuid.uuid4().hex[:16]
        tag = query_tag(self.ident, synth_run=tables.prefix, chunk=chunk, intent=intent)
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

    def status(self, query_id: str) -> StatementStatus:
        return self.hook.get_statement_status(query_id)

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


def failure_message(acct: Accounting, failed_ratio: float, max_failed_ratio: float, failures_path: Any,
                    tables: StagingTables) -> str:
    """Say what failed, what a retry can and cannot change, and where the evidence is (the operators say it
    with :func:`~airflow_provider_synth.runs.base.failure_message` and :func:`failure_hints`)."""
    head = (f"{acct.failed + acct.missing} of {acct.total} requests failed or are missing ({failed_ratio:.1%} > "
            f"max_failed_ratio {max_failed_ratio:.1%}); see {failures_path}.")
    return " ".join([head, *failure_hints(acct, tables)])


def failure_hints(acct: Accounting, tables: StagingTables) -> list[str]:
    """What a Cortex retry can and cannot change, and where the staging tables are."""
    parts = []
    if acct.failed:
        parts.append(f"{acct.failed} got a per-row Cortex error (or an answer the output checks refused): these "
                     "are final, a retry does not ask the model again for them.")
    if acct.missing:
        parts.append(f"{acct.missing} have no answer (their statement failed or was cancelled): a retry answers "
                     "only these.")
    parts.append(f"The staging tables {tables.prefix}_{{{','.join(TABLE_SUFFIXES)}}} are kept; list or drop "
                 "them with `airflow-synth cortex-staging` or on a schedule with CortexStagingCleanupOperator.")
    return parts


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
