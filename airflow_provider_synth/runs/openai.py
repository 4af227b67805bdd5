"""The state of one OpenAI/Azure batch run, rebuilt from the service on every step.

A run is one task's input, split into shards. Round 0 submits every shard; each later round resubmits, per
shard, only the requests that a retry can fix. The service is the source of truth: every batch carries the
run's idempotency key, shard and round in its ``metadata``, and every upload a file name built from them, so a
retried or restarted task re-attaches to what it already paid for instead of submitting again.

This module orchestrates the hook and the core; it holds no Airflow context.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import redact

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.jsonl import iter_jsonl, loads
from airflow_provider_synth.batch.landing import (
    IncompleteFileError,
    landed,
    landing,
    read_record,
    write_record,
)
from airflow_provider_synth.batch.manifest import build_manifest, output_paths
from airflow_provider_synth.batch.merge import (
    Accounting,
    ShardOutputs,
    merge_shards,
    pending_requests,
)
from airflow_provider_synth.batch.paths import join_path, open_path
from airflow_provider_synth.batch.results import ParsedOutput
from airflow_provider_synth.batch.status import TERMINAL_STATUSES
from airflow_provider_synth.batch.usage import (
    USAGE_TOLERANCE,
    Price,
    Usage,
    cost_usd,
    total_cost,
    usage_mismatch,
)
from airflow_provider_synth.hooks.openai import auth_error, batch_summary, is_transient, stream_errors
from airflow_provider_synth.runs.base import RunIdentity, ShardedWork, SynthRun, status_counts
from airflow_provider_synth.runs.openai_direct import DirectRounds, Tier, answer_round, estimate_direct_cost
from airflow_provider_synth.runs.rounds import (  # noqa: F401  (SYSTEMATIC_FILE, ROUND_ESTIMATES_FILE: their old home)
    ROUND_ESTIMATES_FILE,
    SYSTEMATIC_FILE,
    RoundEstimate,
    RoundRules,
    finished_rounds,
)

if TYPE_CHECKING:
    from openai.types import Batch

    from airflow_provider_synth.batch.split import ShardLimits
    from airflow_provider_synth.hooks.openai import OpenAIBatchHook

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
#: the batch ids the run created, rewritten after each creation: re-attach does not depend on the service
#: keeping batch metadata (or on its list endpoint) alone
BATCHES_FILE = "batches.json"
#: Per ``shard-round``: how many times a batch refused for the model's enqueued-token limit was submitted again.
RESUBMITS_FILE = "token_limit_resubmits.json"
#: failure rows of the input lines set aside as invalid (``invalid_requests="skip"``), merged into failures.jsonl
INVALID_FILE = "invalid.jsonl"
#: The batch-level error code of a batch refused because the model's enqueued-token limit was full.
TOKEN_LIMIT_CODE = "token_limit_exceeded"
#: metadata keys on every batch this provider creates (the cleanup operator and the CLI match on them)
KEY_META, SHARD_META, ROUND_META, CREATED_BY_META = "synth_key", "synth_shard", "synth_round", "created_by"
CREATED_BY = "airflow-provider-synth"
#: how far the service's clock may be behind the worker's when listing this run's batches by creation time
CLOCK_SLACK_S = 2 * 86400
#: attempts at one output or error file download within a try, when the stream is cut short
DOWNLOAD_ATTEMPTS = 3
#: file names of uploads start with this, so cleanup never touches anybody else's files
UPLOAD_PREFIX = "synth-"
#: uploads and outputs expire on the service after this (its longest), so nothing piles up in the account
DEFAULT_EXPIRES_AFTER = timedelta(days=30)


@dataclass(frozen=True)
class OpenAIBatchConfig:
    """The OpenAI/Azure Batch API's own knobs (everything every backend shares is an operator argument).

    :param limits: shard limits (requests, bytes, embedding inputs, estimated tokens per batch); default: the
        Batch API's (:class:`~airflow_provider_synth.batch.split.ShardLimits`).
    :param completion_window: the batch window (``24h``).
    :param retry_failed_requests: deprecated alias of the operator's ``retry_failed_requests`` argument (the
        operator sets it here for the run; set away from its default it still works, with a
        ``DeprecationWarning``).
    :param max_active_batches: at most this many of the task's batches in flight at once; the other shards
        wait for them (in waves). With ``limits=ShardLimits(max_tokens=T)`` it keeps the task's enqueued tokens
        under ``max_active_batches * T``, inside the model's enqueued-token limit. Default: every shard at once.
    :param token_limit_resubmits: how many times a batch the service refused because the model's
        enqueued-token limit was full (``token_limit_exceeded``: nothing processed, nothing billed) is submitted
        again, each time after the batches running beside it finished. It does not count as a retry round.
    :param max_cost_usd: deprecated alias of the operator's ``max_cost_usd`` argument (as
        ``retry_failed_requests``).
    :param prices: ``{model: (input, cached_input, output)}`` USD per 1M tokens, over the built-in table.
    :param cancel_on_kill: cancel the running batches when the task is killed or times out.
    :param expires_after: the service deletes this task's uploads and its batches' output and error files
        this long after their creation (1 hour to 30 days; default 30 days); ``None`` keeps them until a
        clean-up deletes them.
    :param endpoint: the endpoint of requests built from records (``requests=`` with a ``template``);
        default ``/v1/chat/completions``. The operator's old ``endpoint=`` argument still works, with a
        ``DeprecationWarning``.
    :param wait_for_completion: ``False``: submit and return the ``submitted`` manifest at once (collect with
        :class:`~airflow_provider_synth.sensors.openai_batch.OpenAIBatchSensor` and
        :class:`~airflow_provider_synth.operators.openai_batch.OpenAIBatchResultsOperator`).
    """

    limits: ShardLimits | None = None
    completion_window: str = "24h"
    retry_failed_requests: int = 2
    max_active_batches: int | None = None
    token_limit_resubmits: int = 20
    max_cost_usd: float | None = None
    prices: Mapping[str, Price | tuple[float, float, float]] = field(default_factory=dict)
    cancel_on_kill: bool = True
    expires_after: timedelta | float | None = DEFAULT_EXPIRES_AFTER
    endpoint: str = "/v1/chat/completions"
    wait_for_completion: bool = True

    def __post_init__(self) -> None:
        if self.retry_failed_requests < 0:
            raise ValueError(f"retry_failed_requests must be >= 0, got {self.retry_failed_requests}")
        if (self.max_active_batches is not None and self.max_active_batches < 1) or self.token_limit_resubmits < 0:
            raise ValueError("max_active_batches must be >= 1 (or None) and token_limit_resubmits >= 0")
        expires = self.expires_after_s
        if expires is not None and not 3600 <= expires <= 30 * 86400:
            raise ValueError(f"expires_after must be between 1 hour and 30 days, got {expires}s")

    @property
    def shard_limits(self) -> ShardLimits:
        """``limits``, or the Batch API's."""
        from airflow_provider_synth.batch.split import ShardLimits

        return self.limits or ShardLimits()

    @property
    def expires_after_s(self) -> int | None:
        """``expires_after`` in whole seconds (``None``: never)."""
        value = self.expires_after
        if value is None:
            return None
        return int(value.total_seconds() if isinstance(value, timedelta) else value)


def run_manifest(run: BatchRun, accounting: Mapping[str, Any] | None, status: str, **fields: Any) -> dict[str, Any]:
    """The manifest of a run: the plan's facts, the batches, the accounting, and ``fields`` (who wrote it:
    dag_id, task_id, run_id, map_index, try_number; cost_usd...). One shape for the operator and the CLI."""
    plan = run.plan
    return build_manifest(
        backend="azure_openai" if run.hook.is_azure else "openai",
        accounting=dict(accounting) if accounting is not None else {"total": plan.total},
        output_dir=plan.output_dir, status=status, batch_ids=run.batch_ids, shards=len(plan.shards),
        rounds=max((r for _, r in [*run.batches, *run.direct.pairs()]), default=0) + 1, idempotency_key=plan.key,
        work_dir=plan.work_dir, conn_id=plan.conn_id, endpoint=plan.endpoint, model=plan.model,
        est_cost_usd=plan.est_cost_usd, est_input_tokens=plan.est_input_tokens,
        token_limit_resubmits=sum(run.resubmit_counts().values()), **fields,
    )


def idempotency_key(dag_id: str, task_id: str, run_id: str, map_index: int, fingerprint: str, endpoint: str) -> str:
    """The run's key: the same task instance over the same input always gets the same key."""
    return RunIdentity(dag_id, task_id, run_id, map_index).run_key(endpoint, fingerprint, sep="|", length=32)


def retry_worthy(out: ParsedOutput) -> bool:
    """Failures a new round can fix; ``batch_cancelled`` too, since only this task (kill, timeout) cancels."""
    return out.retryable or out.error_code == "batch_cancelled"


@dataclass
class Plan:
    """What was submitted, written to ``<work_dir>/plan.json`` before the first upload."""

    key: str
    conn_id: str
    endpoint: str
    model: str | None
    completion_window: str
    work_dir: str
    output_dir: str
    shards: list[dict[str, Any]]
    total: int
    fingerprint: str
    est_input_tokens: int = 0
    est_output_tokens: int = 0
    est_cost_usd: float | None = None
    invalid: int = 0
    created_at: float = field(default_factory=time.time)
    labels: dict[str, str] = field(default_factory=dict)
    #: the output checks (:meth:`OutputChecks.to_spec`), for a re-merge outside the operator
    checks: dict[str, Any] | None = None
    #: uploads, outputs and error files expire this long after their creation (``None``: kept until deleted)
    expires_after_s: int | None = None
    #: when this run first submitted a batch, by the worker's clock (epoch seconds): the deadline's anchor.
    #: The service's ``created_at`` is never compared with this machine's clock (they may be hours apart).
    submitted_at: float | None = None
    #: the run's own prices (``OpenAIBatchConfig.prices``: ``{model: [input, cached_input, output]}``), so
    #: that whoever collects the run (the operator, ``airflow-synth download``) reports the same ``cost_usd``
    prices: dict[str, list[float]] = field(default_factory=dict)

    def save(self, work_dir: Any) -> str:
        path = join_path(work_dir, PLAN_FILE)
        with landing(path) as fp:
            import orjson

            fp.write(orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2))
        return str(path)

    @classmethod
    def load(cls, work_dir: Any) -> Plan:
        with open_path(join_path(work_dir, PLAN_FILE), "rb") as fp:
            return cls(**loads(fp.read()))


@dataclass
class BatchRef:
    """One batch of the run: which shard and round it serves, and its last known state."""

    shard: int
    round: int
    batch_id: str
    state: dict[str, Any]
    created_at: float

    @property
    def terminal(self) -> bool:
        return self.state.get("status") in TERMINAL_STATUSES

    @property
    def token_limited(self) -> bool:
        """Refused at validation because the model's enqueued-token limit was full: it processed nothing, and
        the same requests can be submitted again once other batches finish."""
        return self.state.get("status") == "failed" and any(
            str(e).startswith(TOKEN_LIMIT_CODE) for e in self.state.get("errors") or [])


class BatchRun(ShardedWork, SynthRun):
    """Submit, re-attach, collect and merge the batches of one run (the :class:`SynthRun` of the OpenAI and
    Azure Batch API).

    :param hook: the sync hook of the run's connection.
    :param plan: the run's plan.
    :param path_factory: turns a stored path string back into a path object (ObjectStoragePath for URLs).
    :param checks: output checks: unusable answers are failures, retried in the rounds like retryable ones.
        Default: the checks the plan recorded.
    :param config: the rounds, waves, resubmissions and prices (default: :class:`OpenAIBatchConfig`'s).
    """

    def __init__(self, hook: OpenAIBatchHook, plan: Plan, path_factory: Any = None,
                 checks: OutputChecks | None = None, config: OpenAIBatchConfig | None = None) -> None:
        self.hook, self.plan = hook, plan
        self.config = config or OpenAIBatchConfig()
        self._path = path_factory or (lambda p: p)
        self.batches: dict[tuple[int, int], BatchRef] = {}
        checks = checks if checks is not None else OutputChecks.from_spec(plan.checks)
        self.checks = checks
        self.checker = checks.checker() if checks is not None else None
        #: the ``(shard, round)`` pairs :meth:`next_round` planned, for :meth:`submit`
        self._todo: list[tuple[int, int]] = []
        #: rounds answered through the synchronous API (loaded by :meth:`discover`)
        self.direct = DirectRounds(self._work())
        #: how many requests each pending ``(shard, round)`` holds (written by :meth:`next_round`)
        self.pending: dict[tuple[int, int], int] = {}
        #: output and error files landed and checked by this process
        self._landed: set[str] = set()

    # -- paths ------------------------------------------------------------------------------------------------

    def _output(self, shard: int, rnd: int, kind: str) -> Any:
        return self._work("outputs", f"shard-{shard:05d}-r{rnd}-{kind}.jsonl")

    def upload_name(self, shard: int, rnd: int) -> str:
        return f"{UPLOAD_PREFIX}{self.plan.key}-s{shard:05d}-r{rnd}.jsonl"

    # -- discovery --------------------------------------------------------------------------------------------

    def where(self) -> str:
        """The server and connection, for messages: ``http://127.0.0.1:8787/v1/ (connection 'x')``."""
        return f"{self.hook.client.base_url} (connection {self.hook.conn_id!r})"

    def discover(self) -> None:
        """Find every batch the run created (any try), newest state first."""
        import openai

        from airflow_provider_synth.exceptions import ServerUnreachableError

        self.direct = DirectRounds.load(self._work())
        try:
            found = self.hook.find_batches({KEY_META: self.plan.key}, created_after=self.plan.created_at - CLOCK_SLACK_S)
        except openai.APIConnectionError as exc:  # APITimeoutError included
            raise ServerUnreachableError(
                f"cannot reach {self.where()}: {exc}. Is the server running, and is the connection's host "
                "(base URL) right?") from exc
        except openai.APIStatusError as exc:
            self._raise_refused(exc)
            raise
        for batch in found:
            meta = batch.metadata or {}
            ref = (int(meta.get(SHARD_META, -1)), int(meta.get(ROUND_META, 0)))
            if ref[0] < 0 or ref in self.batches:
                continue  # keep the newest batch of a (shard, round)
            self.batches[ref] = BatchRef(ref[0], ref[1], batch.id, batch_summary(batch), batch.created_at)
        for rec in self._recorded():
            ref = (int(rec["shard"]), int(rec["round"]))
            known = self.batches.get(ref)
            # the record names a later batch than a lagging list shows (a resubmission after a token-limit refusal)
            if known is None or (known.token_limited and known.batch_id != rec["batch_id"]):
                batch = self._recorded_batch(rec["batch_id"])
                self.batches[ref] = BatchRef(ref[0], ref[1], batch.id, batch_summary(batch), batch.created_at)

    def _recorded_batch(self, batch_id: str) -> Batch:
        import openai

        from airflow_provider_synth.exceptions import BatchGoneError

        try:
            return self.hook.get_batch(batch_id)
        except openai.NotFoundError as exc:
            raise BatchGoneError(
                f"batch {batch_id}, recorded in {self._work(BATCHES_FILE)}, is not on {self.where()} any more "
                "(a server restarted without its state forgets its batches, e.g. the local server without "
                f"--state-dir). To submit this run afresh, delete its work folder {self.plan.work_dir} and "
                "retry the task.") from exc

    def _recorded(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = read_record(self._work(BATCHES_FILE), [])
        return rows

    def _record(self) -> None:
        import orjson

        rows = [{"shard": s, "round": r, "batch_id": b.batch_id} for (s, r), b in sorted(self.batches.items())]
        with landing(self._work(BATCHES_FILE)) as fp:
            fp.write(orjson.dumps(rows))

    # -- the run contract -------------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return "azure_openai" if self.hook.is_azure else "openai"

    @property
    def output_dir(self) -> Any:
        return self._path(self.plan.output_dir)

    def attach(self) -> None:
        """Re-attach: :meth:`discover`."""
        self.discover()

    def states(self) -> dict[str, str | None]:
        return {ref.batch_id: ref.state.get("status") for ref in self.batches.values()}

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    def cancel(self) -> list[str]:
        """Cancel the run's batches still running; a failing cancel is logged."""
        cancelled = []
        for batch_id in self.running_ids:
            try:
                self.hook.cancel_batch(batch_id)
                cancelled.append(batch_id)
                log.info("cancelled batch %s", batch_id)
            except Exception as exc:  # best effort: a kill or a timeout must go on
                log.warning("could not cancel batch %s: %s", batch_id, self.describe(exc))
        return cancelled

    def collect(self) -> Accounting:
        """:meth:`merge`."""
        return self.merge()

    @property
    def started_at(self) -> float | None:
        """The worker's clock at the first submission (a plan written before it was recorded: its creation)."""
        if not self.batches and not self.direct.pairs():
            return None
        return self.plan.submitted_at or self.plan.created_at

    def manifest(self, acct: Accounting | None, status: str, **fields: Any) -> dict[str, Any]:
        manifest = run_manifest(self, acct.as_dict() if acct is not None else None, status, **fields)
        if acct is not None:
            manifest.update(self.costs(acct))
        return manifest

    def refresh(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Take terminal batch states from a trigger event where discovery saw them still running (the
        service's list can lag its retrieve)."""
        for ref in self.batches.values():
            state = states.get(ref.batch_id) or {}
            if not ref.terminal and state.get("status") in TERMINAL_STATUSES:
                ref.state = dict(state)

    def poll(self, *, tolerate_errors: bool = True) -> list[tuple[str, BaseException]]:
        """Retrieve every batch not yet terminal.

        :param tolerate_errors: return ``(batch_id, error)`` for each retrieve that failed (the batch keeps
            its last state); ``False`` raises the first error instead.
        """
        errors: list[tuple[str, BaseException]] = []
        for ref in self.batches.values():
            if ref.terminal:
                continue
            try:
                ref.state = batch_summary(self.hook.get_batch(ref.batch_id))
            except Exception as error:
                refused = auth_error(error, self.hook)
                if refused is not None:
                    raise refused from error
                if not tolerate_errors:
                    raise
                errors.append((ref.batch_id, error))
        return errors

    @property
    def batch_ids(self) -> list[str]:
        return [self.batches[k].batch_id for k in sorted(self.batches)]

    @property
    def running_ids(self) -> list[str]:
        return [self.batches[k].batch_id for k in sorted(self.batches) if not self.batches[k].terminal]

    @property
    def first_created_at(self) -> float | None:
        return min((b.created_at for b in self.batches.values()), default=None)

    def last_round(self, shard: int) -> int:
        return max((r for s, r in [*self.batches, *self.direct.pairs()] if s == shard), default=-1)

    # -- submission -------------------------------------------------------------------------------------------

    def _existing_uploads(self) -> dict[str, str]:
        prefix = f"{UPLOAD_PREFIX}{self.plan.key}-"
        return {f.filename: f.id for f in self.hook.list_files(purpose="batch") if f.filename.startswith(prefix)}

    def _raise_refused(self, exc: BaseException) -> None:
        """Raise a 401/403 as :class:`~airflow_provider_synth.exceptions.ConnectionAuthError` (no retry)."""
        refused = auth_error(exc, self.hook)
        if refused is not None:
            raise refused from exc

    def submit(self, todo: Iterable[tuple[int, int]] | None = None, max_active: int | None = None) -> list[str]:
        """:meth:`_submit`; the service refusing the connection's credentials fails the task without retries."""
        import openai

        try:
            return self._submit(todo, max_active)
        except openai.APIStatusError as exc:
            self._raise_refused(exc)
            raise

    def _submit(self, todo: Iterable[tuple[int, int]] | None = None, max_active: int | None = None) -> list[str]:
        """Upload and create the batches of ``(shard, round)`` pairs not created yet (or refused for the
        enqueued-token limit), at most ``max_active`` of this run running at once; reuse uploads a crashed try
        left behind. Returns the new batch ids; pairs over the cap wait for a later call.

        :param todo: the pairs; default: those :meth:`next_round` planned last.
        :param max_active: default: the config's ``max_active_batches``.
        """
        todo = self._todo if todo is None else todo
        max_active = self.config.max_active_batches if max_active is None else max_active
        todo = [t for t in todo if (t not in self.batches or self.batches[t].token_limited)
                and self.direct.get(*t) is None]
        if not todo:
            return []
        uploads = self._existing_uploads()
        created: list[str] = []
        active = len(self.running_ids)
        for shard, rnd in todo:
            if max_active is not None and active >= max_active:
                log.info("%d batch(es) running (max_active_batches=%d): %d shard round(s) wait for them",
                         active, max_active, len(todo) - len(created))
                break
            if (shard, rnd) in self.batches:
                n = self._count_resubmit(shard, rnd)
                log.info("shard %d round %d: batch %s was refused for the model's enqueued-token limit; "
                         "submitting it again (%d)", shard, rnd, self.batches[(shard, rnd)].batch_id, n)
            name = self.upload_name(shard, rnd)
            file_id = uploads.get(name) or self.hook.upload_file(
                self.shard_input(shard, rnd), filename=name, expires_after_s=self.plan.expires_after_s).id
            if self.plan.submitted_at is None:  # recorded before the first batch exists: a crash keeps it
                self.plan.submitted_at = time.time()
                self.plan.save(self._work())
            metadata = {KEY_META: self.plan.key, SHARD_META: str(shard), ROUND_META: str(rnd),
                        CREATED_BY_META: CREATED_BY, **self.plan.labels}
            batch: Batch = self.hook.create_batch(
                file_id, self.plan.endpoint, self.plan.completion_window, metadata,  # type: ignore[arg-type]
                output_expires_after_s=self.plan.expires_after_s)
            self.batches[(shard, rnd)] = BatchRef(shard, rnd, batch.id, batch_summary(batch), batch.created_at)
            self._record()
            created.append(batch.id)
            active += 1
            log.info("shard %d round %d: submitted batch %s (%s)", shard, rnd, batch.id, name)
        return created

    # -- collection -------------------------------------------------------------------------------------------

    def _outputs_of(self, shard: int) -> tuple[list[Any], list[int]]:
        """Every output and error file of the shard's finished rounds (downloaded once), and their rounds."""
        files, rounds = [], []
        for rnd in range(self.last_round(shard) + 1):
            direct = self.direct.outputs(shard, rnd)
            files += direct
            rounds += [rnd] * len(direct)
            ref = self.batches.get((shard, rnd))
            if ref is None or not ref.terminal:
                continue
            for kind in ("output", "error"):
                file_id = ref.state.get(f"{kind}_file_id")
                if not file_id:
                    continue
                dest = self._output(shard, rnd, kind)
                self._download(file_id, dest)
                files.append(dest)
                rounds.append(rnd)
        return files, rounds

    def _download(self, file_id: str, dest: Any) -> None:
        """Land a batch's output or error file at ``dest`` once: whole, and as large as the Files API says. A
        file an earlier try left of another size (cut short by a crash or a full disk) is fetched again; a
        download cut mid-stream is tried again up to ``DOWNLOAD_ATTEMPTS`` times in this try."""
        import openai

        if str(dest) in self._landed:
            return
        try:
            expected = self.hook.get_file(file_id).bytes
        except openai.APIStatusError as exc:
            self._raise_refused(exc)
            raise
        if landed(dest, expected):
            self._landed.add(str(dest))
            return
        again: tuple[type[BaseException], ...] = (IncompleteFileError, *stream_errors())
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                self.hook.download_file(file_id, dest, expected_bytes=expected)
                break
            except again as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise IncompleteFileError(
                        f"downloading file {file_id} from {self.where()} to {dest} failed {attempt} times, last: "
                        f"{redact(str(exc))} ({type(exc).__name__}); nothing was kept. Retry the task: it "
                        "re-attaches to the batch and downloads the file again, paying nothing twice") from exc
                log.warning("downloading file %s to %s was cut short (%s: %s); downloading it again (%d of %d)",
                            file_id, dest, type(exc).__name__, redact(str(exc)), attempt + 1, DOWNLOAD_ATTEMPTS)
        self._landed.add(str(dest))

    def next_round(self, max_rounds: int | None = None,
                   token_limit_resubmits: int | None = None) -> list[tuple[int, int]]:
        """Plan the next round: the ``(shard, round)`` pairs to :meth:`submit` (empty: nothing left to retry).
        With a direct-API tail (``checks.direct_tail``), small retry rounds are answered here instead, through
        the synchronous API, and a direct round a crashed try left unfinished is finished here whatever the
        tail is set to now.

        :param max_rounds: retry rounds (default: the config's ``retry_failed_requests``).
        :param token_limit_resubmits: default: the config's.
        """
        cfg = self.config
        rounds = cfg.retry_failed_requests if max_rounds is None else max_rounds
        resubmits = cfg.token_limit_resubmits if token_limit_resubmits is None else token_limit_resubmits
        todo = self.plan_round(rounds, resubmits)
        checks = self.checks or OutputChecks()
        while todo and (checks.direct_tail or any(self.direct.get(*t) is not None for t in todo)):
            budget = None if cfg.max_cost_usd is None else cfg.max_cost_usd - self.rules.spent(self.plan.est_cost_usd)
            rest = self.answer_directly(todo, checks.direct_tail, checks.direct_concurrency, budget, cfg.prices,
                                        Tier(checks.direct_service_tier, checks.direct_tier_fallback))
            if rest == todo:
                break
            todo = self.plan_round(rounds, resubmits)
        todo = self._within_budget(todo)
        self._todo = todo
        return todo

    @property
    def rules(self) -> RoundRules:
        """The retry rounds' money rules (:mod:`~airflow_provider_synth.runs.rounds`), on this run's work folder."""
        return RoundRules(self._work, self.checks, self.checker, max_cost_usd=self.config.max_cost_usd)

    def _within_budget(self, todo: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Estimate the retry rounds of ``todo`` (their requests' tokens at batch prices) against
        ``max_cost_usd`` before anything is paid (:meth:`RoundRules.within_budget`: round 0's estimate, the
        earlier retry rounds' and the direct tail's count too). Rounds over the budget are not submitted (their
        requests stay failures)."""
        retry = [t for t in todo if t[1] > 0 and t not in self.batches]
        if not retry:
            return todo
        from airflow_provider_synth.batch.usage import estimate_cost

        estimate = RoundEstimate.of_lines(
            (raw for shard, rnd in retry for raw in self._round_requests(shard, rnd)),
            lambda tokens_in, tokens_out: estimate_cost(tokens_in, tokens_out, self.plan.model, self.config.prices))
        if self.rules.within_budget(retry, estimate, before=(self.plan.est_cost_usd or 0.0) + self.direct.est_cost_usd):
            return todo
        return [t for t in todo if t not in retry]

    def round_estimates(self) -> dict[str, float]:
        """The estimated cost of each retry round submitted (``"shard-round"``: USD), for the budget."""
        return self.rules.round_estimates()

    def plan_round(self, max_rounds: int, token_limit_resubmits: int = 0) -> list[tuple[int, int]]:
        """Write, per shard whose batches are all terminal, the requests a new round should retry; return the
        ``(shard, round)`` pairs to submit. A shard with no batch yet gets round 0; a round refused for the
        enqueued-token limit is submitted again as it was (up to ``token_limit_resubmits`` times), without
        counting as a retry round."""
        todo = []
        resubmits = self.resubmit_counts()
        keep = RoundRules.keep(retry_worthy, self._stop_systematic_kinds())

        for shard in range(len(self.plan.shards)):
            last = self.last_round(shard)
            if last < 0:
                todo.append((shard, 0))
                continue
            direct = self.direct.get(shard, last)
            if direct is not None and not direct.get("done"):
                todo.append((shard, last))  # a direct round a crash interrupted: finish it
                continue
            ref = self.batches.get((shard, last))
            if ref is not None and not ref.terminal:
                continue
            if ref is not None and ref.token_limited:
                done = resubmits.get(f"{shard}-{last}", 0)
                if done < token_limit_resubmits:
                    todo.append((shard, last))
                    continue
                log.warning("shard %d round %d: refused for the enqueued-token limit %d time(s); giving up on "
                            "resubmitting it", shard, last, done + 1)
            if last >= max_rounds:
                continue
            base = self.shard_input(shard, 0)
            with landing(self.shard_input(shard, last + 1)) as out:
                n = pending_requests(base, self._outputs_of(shard)[0], out, retryable_only=False, keep=keep,
                                     checks=self.checker)
            if n:
                self.pending[(shard, last + 1)] = n
                log.info("shard %d: %d request(s) to retry in round %d", shard, n, last + 1)
                todo.append((shard, last + 1))
        return todo

    def systematic(self) -> dict[str, dict[str, Any]]:
        """The kinds of unusable answers found systematic (not retried), kept in the work folder so a resumed
        task knows them (:meth:`RoundRules.systematic`)."""
        return self.rules.systematic()

    def _stop_systematic_kinds(self) -> set[str]:
        """Judge each finished round's unusable answers (over every shard at that round): a kind systematic
        there is not retried again, unless ``checks.retry_systematic`` (:meth:`RoundRules.stopped_kinds`)."""
        def ended() -> Any:
            for shard in range(len(self.plan.shards)):
                last = self.last_round(shard)
                ref = self.batches.get((shard, last))
                if last >= 0 and (ref is None or ref.terminal):
                    yield (*self._outputs_of(shard), last)

        return self.rules.stopped_kinds(finished_rounds(ended()))

    def systematic_message(self) -> str | None:
        """Why the task fails though its answers landed: the kinds found systematic, with examples."""
        return self.rules.systematic_message()

    def resubmit_counts(self) -> dict[str, int]:
        """How many times each ``shard-round`` was submitted again after a token-limit refusal."""
        counts: dict[str, int] = read_record(self._work(RESUBMITS_FILE), {})
        return counts

    def _count_resubmit(self, shard: int, rnd: int) -> int:
        counts = self.resubmit_counts()
        key = f"{shard}-{rnd}"
        counts[key] = counts.get(key, 0) + 1
        write_record(self._work(RESUBMITS_FILE), counts)
        return counts[key]

    def merge(self) -> Accounting:
        """Merge every shard's rounds into results.jsonl and failures.jsonl of the output folder."""
        out = output_paths(self._path(self.plan.output_dir))
        shards = [ShardOutputs(self.shard_input(i, 0), *self._outputs_of(i)) for i in range(len(self.plan.shards))]
        invalid = self._work(INVALID_FILE) if self.plan.invalid else None
        with landing(out["results_path"]) as rf, landing(out["failures_path"]) as ff:
            return merge_shards(shards, rf, ff, self.checker, invalid=invalid)

    # -- the direct-API tail ----------------------------------------------------------------------------------

    def answer_directly(self, todo: list[tuple[int, int]], limit: int, concurrency: int,
                        budget_usd: float | None = None, prices: Mapping[str, Any] | None = None,
                        tier: Tier | None = None) -> list[tuple[int, int]]:
        """Answer the retry rounds of ``todo`` through the synchronous API when, together, they hold at most
        ``limit`` requests and their direct cost fits ``budget_usd`` (what ``max_cost_usd`` leaves after the
        batch estimate and earlier direct rounds); a direct round a crash interrupted is always finished.
        Returns the pairs still to submit as batches."""
        resumed = [t for t in todo if self.direct.get(*t) is not None]
        fresh = [t for t in todo if t[1] > 0 and t not in resumed]
        if not limit or sum(self.pending.get(t, 0) for t in fresh) > limit:
            fresh = []
        requests = {t: self._round_requests(*t) for t in [*resumed, *fresh]}
        est = estimate_direct_cost([r for t in fresh for r in requests[t]], self.plan.model, prices, tier)
        if fresh and budget_usd is not None:
            left = budget_usd - self.direct.est_cost_usd
            if est is None or est > left:
                log.warning("the direct-API tail would cost up to $%s, over the $%.4f max_cost_usd leaves: "
                            "retrying in a batch instead", est, left)
                fresh = []
        for t in fresh:  # the decision is recorded before any call: a retried task finishes these rounds directly
            self.direct.rounds[f"{t[0]}-{t[1]}"] = {"requests": len(requests[t]), "parts": 0, "done": False,
                                                    "est_cost_usd": (est or 0.0) / len(fresh)}
        if fresh:
            self.direct.save()
        for shard, rnd in [*resumed, *fresh]:
            answer_round(self.hook, self.direct, shard, rnd, requests[(shard, rnd)], concurrency, tier)
        return [t for t in todo if t not in resumed and t not in fresh]

    def costs(self, acct: Accounting, prices: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``cost_usd``: every answer billed (results, and unusable answers the checks refused) at the batch
        price, plus the direct-API tail at the direct price; the tail's and the checks' share; and the ratio of
        the results' actual input tokens to the estimate for as many requests (``input_tokens_ratio``)."""
        model, plan = self.plan.model, self.plan
        if prices is None:  # the prices the run was planned with, whoever collects it
            prices = {**plan.prices, **self.config.prices}
        direct = self.direct.summary(model, prices)
        billed = Usage().add(acct.usage).add(acct.unusable_usage)
        batch_usage = Usage(**{k: max(v - direct["direct_usage"][k], 0) for k, v in billed.as_dict().items()})
        batch_cost = cost_usd(batch_usage, model, prices)
        # what cost_usd prices: every answer billed, the results' usage ("usage") and the unusable ones'
        out: dict[str, Any] = {"cost_usd": batch_cost, "billed_usage": billed.as_dict()}
        out.update(self._service_usage(batch_usage))
        if direct["direct_rounds"]:
            out.update(direct)
            dc = direct["direct_cost_usd"]
            out["cost_usd"] = total_cost([batch_cost, dc])
        if acct.checked:
            out["checks"] = {**acct.checks_dict(), "cost_usd": cost_usd(acct.unusable_usage, model, prices)}
        sent = plan.total - plan.invalid  # the estimate covers the requests sent, not the invalid lines
        if plan.est_input_tokens and acct.succeeded and sent:
            expected = plan.est_input_tokens * acct.succeeded / sent
            out["input_tokens_ratio"] = round(acct.usage.prompt_tokens / expected, 4)
        return out

    def _service_usage(self, own: Usage) -> dict[str, Any]:
        """The service's own usage for the run's batches (``service_usage``, where every batch reports one),
        beside the run's sum; a difference over :data:`~airflow_provider_synth.batch.usage.USAGE_TOLERANCE` is
        logged and kept as ``usage_mismatch``."""
        reported = [ref.state.get("usage") for ref in self.batches.values()]
        if not reported or any(u is None for u in reported):
            return {}
        service = Usage()
        for u in reported:
            service.add(Usage.from_dict(u or {}))
        service.requests = own.requests
        out: dict[str, Any] = {"service_usage": service.as_dict()}
        models = sorted({str(m) for ref in self.batches.values() if (m := ref.state.get("model"))})
        if models:
            out["service_model"] = models[0] if len(models) == 1 else models
        mismatch = usage_mismatch(own, service)
        if mismatch:
            log.warning("the run's own token count differs from what the service reports for its batches by over "
                        "%.0f%%: %s (answers the merge did not read, or tokens billed for answers never returned)",
                        USAGE_TOLERANCE * 100, mismatch)
            out["usage_mismatch"] = mismatch
        return out

    def _round_requests(self, shard: int, rnd: int) -> list[bytes]:
        with open_path(self.shard_input(shard, rnd), "rb") as fp:
            return [bytes(raw) for _, raw in iter_jsonl(fp)]

    def statuses(self) -> dict[str, int]:
        """How many of the run's batches are in each status."""
        return status_counts(self.states())

