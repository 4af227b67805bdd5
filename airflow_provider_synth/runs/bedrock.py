"""One Amazon Bedrock batch inference run: translate, stage in S3, create or re-attach, wait, read back, retry.

A run is one task's OpenAI batch JSONL on one Bedrock model. :func:`prepare` validates every line, translates
it into the model family's native ``modelInput`` (what the family cannot take is refused before anything is
staged), and splits the records into as few jobs as Bedrock's limits allow, each holding at least the minimum.
Everything lives under the run's staging folder ``<staging_prefix>/<run key>/`` in S3, through the ``aws``
connection: the plan, and per job (shard and round) its OpenAI lines, its records and Bedrock's output.

**No second job.** Every job is created with a ``clientRequestToken`` built from the run key, shard and round:
a create whose response was lost, or a retried task that never recorded the job, gets the same job back from
Bedrock, never a second one. The ARNs are also recorded in ``jobs.json``.

**Rounds.** A ``PartiallyCompleted`` job lands what succeeded; the records a retry can fix (429, 5xx, records
of a stopped or expired job, answers the output checks refused) go into a follow-up job of just those, up to
``retry_failed_requests`` rounds; a 400 (a body the model refused) is final. A ``Failed`` job's records fail with
its message.

This module holds no Airflow context: the operator drives it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.errors import InvalidRequestsError, Problem
from airflow_provider_synth.batch.jsonl import iter_jsonl, loads
from airflow_provider_synth.batch.keys import run_key
from airflow_provider_synth.batch.manifest import build_manifest, output_paths
from airflow_provider_synth.batch.merge import Accounting, ShardOutputs, merge_shards, pending_requests
from airflow_provider_synth.batch.paths import as_path, exists, join_path, list_names, open_path
from airflow_provider_synth.batch.requests import CHAT, EMBEDDINGS
from airflow_provider_synth.batch.results import ParsedOutput, error_line
from airflow_provider_synth.batch.status import JOB_PHASES, JOBS
from airflow_provider_synth.batch.usage import (
    Usage,
    check_budget,
    cost_usd,
    declared_output_tokens,
    estimate_cost,
    estimate_request_tokens,
)
from airflow_provider_synth.batch.validate import InvalidRequests, LineChecker, Source, checked_passes
from airflow_provider_synth.runs.base import SynthRun
from airflow_provider_synth.runs.bedrock_mapping import (
    BedrockLimits,
    Family,
    Unsupported,
    family_of,
    job_sizes,
    output_line,
    plan_jobs,
    prices_for,
    record_id,
    record_index,
    to_record,
)
from airflow_provider_synth.runs.rounds import RoundEstimate, RoundRules, finished_rounds

if TYPE_CHECKING:
    from airflow_provider_synth.hooks.bedrock import BedrockBatchHook

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
JOBS_FILE = "jobs.json"
INVALID_FILE = "invalid.jsonl"
#: the endpoints a Bedrock batch run takes (each family serves one of them)
ENDPOINTS: tuple[str, ...] = (CHAT, EMBEDDINGS)
#: what the records of a job without output become, by the job's final status: the core's retry table then
#: decides (an expired job's records are retried; a stopped job's too, since only this task stops its jobs)
NO_OUTPUT_CODES = {"Expired": "batch_expired", "Stopped": "batch_cancelled", "Failed": "job_failed"}
TAG_CREATED_BY = "airflow-provider-synth"


def retry_worthy(out: ParsedOutput) -> bool:
    """Failures a new round can fix: the core's retryable ones, and the records of a job this task stopped."""
    return out.retryable or out.error_code == "batch_cancelled"


@dataclass(frozen=True)
class BedrockBatchConfig:
    """Bedrock's own knobs (everything every backend shares is an operator argument).

    :param limits: Bedrock's quotas for the model (records per job, minimum records, file and record size):
        :class:`~airflow_provider_synth.runs.bedrock_mapping.BedrockLimits`; default: AWS's defaults.
    :param pad_to_minimum: fill a job below ``limits.min_records`` with padding records (each a copy of the
        smallest request answering at most one token: billed, dropped from the output) instead of refusing the
        input; retry rounds below the minimum are padded too (without it they are not submitted).
    :param role_arn: the IAM service role Bedrock assumes to read the input and write the output in S3
        (required; templated through the operator's ``role_arn`` attribute).
    :param staging_prefix: ``s3://bucket/prefix`` where the run's records and Bedrock's output go (required;
        the ``role_arn`` must be able to read and write it, the connection too; templated likewise).
    :param retry_failed_requests: deprecated alias of the operator's ``retry_failed_requests`` argument (the
        operator sets it here for the run; set away from its default it still works, with a
        ``DeprecationWarning``).
    :param job_timeout_hours: each job's ``timeoutDurationInHours`` (24 to 168); ``None``: Bedrock's default.
    :param prices: ``{model id: (input, cached input, output)}`` on-demand USD per 1M tokens, over
        :data:`~airflow_provider_synth.runs.bedrock_mapping.BEDROCK_PRICES` (batch bills half).
    :param region_name: overrides the connection's region.
    :param cancel_on_kill: stop the jobs when the task is killed or times out.
    :param max_active_jobs: at most this many of the task's jobs in flight at once (the model's quota of
        concurrent batch jobs); the others wait for them, in waves. Default: every job at once.
    :param endpoint: the endpoint of requests built from records (``requests=`` with a ``template``):
        ``/v1/chat/completions`` (default) or ``/v1/embeddings`` (Titan embeddings).
    """

    limits: BedrockLimits | None = None
    pad_to_minimum: bool = False
    retry_failed_requests: int = 2
    job_timeout_hours: int | None = 24
    prices: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    region_name: str | None = None
    cancel_on_kill: bool = True
    max_active_jobs: int | None = None
    endpoint: str = CHAT
    role_arn: str | None = None
    staging_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.max_active_jobs is not None and self.max_active_jobs < 1:
            raise ValueError(f"max_active_jobs must be >= 1 (or None), got {self.max_active_jobs}")
        if self.retry_failed_requests < 0:
            raise ValueError(f"retry_failed_requests must be >= 0, got {self.retry_failed_requests}")
        if self.job_timeout_hours is not None and not 24 <= self.job_timeout_hours <= 168:
            raise ValueError(f"job_timeout_hours must be between 24 and 168 (Bedrock's range), got "
                             f"{self.job_timeout_hours}")


@dataclass
class BedrockPlan:
    """What the run submits, written to ``<staging>/plan.json`` before the first job is created.

    :param key: the run key (dag_id, task_id, run_id, map_index, the input's fingerprint, the model).
    :param staging: the run's staging folder (a URL that keeps the connection: ``s3://conn@bucket/prefix/key``).
    :param shards: records per job of round 0.
    :param padding: padding records per ``shard-round`` (``pad_to_minimum``).
    """

    key: str
    conn_id: str | None
    region_name: str | None
    model_id: str
    family: str
    endpoint: str
    role_arn: str
    staging: str
    output_dir: str
    shards: list[int]
    total: int
    invalid: int
    fingerprint: str
    timeout_hours: int | None = None
    pad_to_minimum: bool = False
    limits: dict[str, int] = field(default_factory=dict)
    padding: dict[str, int] = field(default_factory=dict)
    checks: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    #: round 0's estimate at batch prices (``None``: not estimated, no ``max_cost_usd``), before the retry rounds'
    est_cost_usd: float | None = None

    def save(self) -> None:
        with open_path(join_path(as_path(self.staging), PLAN_FILE), "wb") as fp:
            fp.write(orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, staging: Any) -> BedrockPlan | None:
        path = join_path(as_path(staging) if isinstance(staging, str) else staging, PLAN_FILE)
        if not exists(path):
            return None
        with open_path(path, "rb") as fp:
            return cls(**loads(fp.read()))


def staging_folder(prefix: str, conn_id: str | None, key: str) -> str:
    """The run's staging folder as a URL that keeps the connection (``s3://conn@bucket/prefix/key``)."""
    if not prefix.startswith("s3://"):
        raise ValueError(f"staging_prefix must be an s3:// URL (Bedrock reads its input from S3), got {prefix!r}")
    rest = prefix[len("s3://"):].rstrip("/")
    if "@" not in rest.split("/", 1)[0] and conn_id:
        rest = f"{conn_id}@{rest}"
    return f"s3://{rest}/{key}"


def s3_uri(path: Any) -> str:
    """The plain ``s3://bucket/key`` of a path (Bedrock takes no connection in a URI)."""
    text = str(path)
    rest = text[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return f"s3://{bucket.rsplit('@', 1)[-1]}/{key}"


# -- preparing -------------------------------------------------------------------------------------------------


@dataclass
class _Translated:
    """One pass's output: the valid OpenAI lines and their native bodies, in scratch files."""

    requests: Any
    inputs: Any
    total: int = 0
    valid: int = 0
    record_bytes: int = 0
    smallest: bytes | None = None
    digest: Any = field(default_factory=hashlib.sha256)
    est_input_tokens: int = 0
    est_output_tokens: int = 0


def _translate_pass(src: Source, family: Family, scratch: str, limits: BedrockLimits, estimate: bool = False) -> Any:
    def one_pass(checker: LineChecker) -> _Translated:
        out = _Translated(open(os.path.join(scratch, "requests.jsonl"), "wb"),  # noqa: SIM115
                          open(os.path.join(scratch, "inputs.jsonl"), "wb"))  # noqa: SIM115
        try:
            for lineno, raw in src.lines():
                out.total += 1
                checked = checker.check(lineno, raw)
                if checked is None:
                    continue
                request = loads(raw)
                try:
                    native = orjson.dumps(to_record(family, "", checked.url, request["body"])["modelInput"])
                except Unsupported as exc:
                    checker.problem(lineno, checked.custom_id, str(exc))
                    continue
                size = len(native) + 40
                if size > limits.max_record_bytes:
                    checker.problem(lineno, checked.custom_id, f"the Bedrock record is {size:,} bytes, over "
                                    f"max_record_bytes {limits.max_record_bytes:,}")
                    continue
                out.requests.write(raw + b"\n")
                out.inputs.write(native + b"\n")
                out.digest.update(raw)
                out.valid += 1
                out.record_bytes += size
                if estimate:  # for max_cost_usd, as the OpenAI planner does
                    out.est_input_tokens += estimate_request_tokens(request)
                    out.est_output_tokens += declared_output_tokens(request)
                if out.smallest is None or len(native) < len(out.smallest):
                    out.smallest = native
        finally:
            out.requests.close()
            out.inputs.close()
        return out

    return one_pass


def _pad_input(native: bytes) -> dict[str, Any]:
    """A padding record's body: the smallest request's, answering one token at most (billed, then dropped)."""
    body: dict[str, Any] = loads(native)
    for key in ("max_gen_len", "max_tokens"):
        if key in body:
            body[key] = 1
    if isinstance(body.get("inferenceConfig"), dict):
        body["inferenceConfig"]["maxTokens"] = 1
    return body


def below_minimum_message(name: str, count: int, limits: BedrockLimits) -> str:
    return (f"{name} holds {count} valid request(s); a Bedrock batch job takes at least {limits.min_records} "
            "records (the 'Minimum number of records per batch inference job' quota). Add requests, pass "
            "pad_to_minimum=True to fill the job with padding records (each a copy of the smallest request "
            "answering at most one token: billed, dropped from the output), or, if your account's quota is "
            "lower, set BedrockLimits(min_records=...).")


def prepare(source: Any, *, key_parts: tuple[str, str, str, int], model_id: str, role_arn: str,
            staging_prefix: str, conn_id: str | None, output_dir: Any, region_name: str | None = None,
            limits: BedrockLimits | None = None, invalid_requests: InvalidRequests = "fail",
            pad_to_minimum: bool = False, checks: OutputChecks | None = None,
            timeout_hours: int | None = None, name: str | None = None, max_cost_usd: float | None = None,
            prices: Mapping[str, tuple[float, float, float]] | None = None) -> BedrockPlan:
    """Validate and translate the input, check the budget, then stage round 0 unless an earlier try did: the
    run's plan.

    :param source: the OpenAI batch JSONL (a path, URL or path object).
    :param key_parts: (dag_id, task_id, run_id, map_index) of the task instance.
    :param max_cost_usd: refuse (nothing staged) when the estimate at Bedrock's batch prices is above this.
    :param prices: price overrides (``BedrockBatchConfig.prices``).
    :raises InvalidRequestsError: every line a family cannot take, or too few records; nothing is staged.
    :raises BudgetExceededError: the estimate is over ``max_cost_usd`` (or unknown while it is set).
    """
    limits = limits or BedrockLimits()
    family = family_of(model_id)
    src = Source(as_path(source) if isinstance(source, str) else source, name)
    with tempfile.TemporaryDirectory(prefix="synth-bedrock-") as scratch:
        rejected = os.path.join(scratch, INVALID_FILE)
        result, checker = checked_passes(
            src, _translate_pass(src, family, scratch, limits, estimate=max_cost_usd is not None), lambda r: r.total,
            invalid_requests=invalid_requests, open_rejected=lambda: open(rejected, "wb"),  # noqa: SIM115
            endpoints=ENDPOINTS)
        if result.valid < limits.min_records and not pad_to_minimum:
            raise InvalidRequestsError([Problem(src.name, 0, None,
                                                below_minimum_message(src.name, result.valid, limits))])
        est = estimate_cost(result.est_input_tokens, result.est_output_tokens, model_id,
                            prices_for(model_id, prices))
        check_budget(est, max_cost_usd, model=model_id, input_tokens=result.est_input_tokens,
                     output_tokens=result.est_output_tokens, log=log, what="staged",
                     unknown=f"no Bedrock batch price for {model_id!r}: add it to config.prices")
        fingerprint = result.digest.hexdigest()
        key = run_key(*key_parts, model_id, fingerprint, sep="|", length=32)
        staging = staging_folder(staging_prefix, conn_id, key)
        found = BedrockPlan.load(staging)
        if found is not None:
            log.info("Bedrock run %s: staged by an earlier try (%s)", key, staging)
            return found
        plan = BedrockPlan(key, conn_id, region_name, model_id, family.name, checker.endpoint or family.endpoint,
                           role_arn, staging, str(output_dir), [], result.total,
                           checker.rejected.count if checker.rejected is not None else 0, fingerprint,
                           timeout_hours, pad_to_minimum, asdict(limits),
                           checks=checks.to_spec() if checks is not None else None, est_cost_usd=est)
        run = BedrockRun(None, plan)
        if plan.invalid:
            with open(rejected, "rb") as src_fp, open_path(run.work(INVALID_FILE), "wb") as dst:
                dst.write(src_fp.read())
        try:
            sizes = job_sizes(result.valid, plan_jobs(result.valid, result.record_bytes, limits))
        except Unsupported as exc:
            raise InvalidRequestsError([Problem(src.name, 0, None, str(exc))]) from None
        with open(os.path.join(scratch, "requests.jsonl"), "rb") as reqs, \
                open(os.path.join(scratch, "inputs.jsonl"), "rb") as inputs:
            for shard, size in enumerate(sizes):
                lines = [(reqs.readline(), inputs.readline()) for _ in range(size)]
                run.write_job_files(shard, 0, [r.rstrip(b"\n") for r, _ in lines],
                                    [loads(i) for _, i in lines], result.smallest)
        plan.shards = sizes
        plan.save()
        log.info("Bedrock run %s: %d records (%s) staged as %d job(s) of %s records in %s", key, result.valid,
                 family.name, len(sizes), "/".join(map(str, sizes)), staging)
        return plan


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class JobRef:
    """One job of the run: the shard and round it serves, and its last known state."""

    shard: int
    round: int
    job_arn: str
    state: dict[str, Any]
    created_at: float

    @property
    def finished(self) -> bool:
        return JOB_PHASES.get(self.state.get("status"), False)


class BedrockRun(SynthRun):
    """Create, re-attach to, poll, stop and read back the jobs of one run (the backend contract's
    :class:`~airflow_provider_synth.runs.base.SynthRun`: the wait loop and the finish are written there).

    :param hook: the sync hook of the run's ``aws`` connection (``None``: staging only).
    :param plan: the run's plan.
    :param max_rounds: retry rounds after round 0 (``retry_failed_requests``).
    :param checks: output checks (default: the plan's).
    :param prices: price overrides (model id -> (input, cached input, output) USD per 1M tokens, on demand).
    :param max_active_jobs: at most this many jobs in flight at once (``None``: no cap).
    :param max_cost_usd: the budget every retry round is estimated against before it is staged.
    """

    backend = "bedrock"
    waited = JOBS

    def __init__(self, hook: BedrockBatchHook | None, plan: BedrockPlan, *, max_rounds: int = 2,
                 checks: OutputChecks | None = None, prices: Mapping[str, Any] | None = None,
                 max_active_jobs: int | None = None, max_cost_usd: float | None = None) -> None:
        self.hook, self.plan = hook, plan
        self.max_active_jobs = max_active_jobs
        self.family = family_of(plan.model_id)
        self.limits = BedrockLimits(**plan.limits) if plan.limits else BedrockLimits()
        self.max_rounds = int(max_rounds)
        checks = checks if checks is not None else OutputChecks.from_spec(plan.checks)
        self.checker = checks.checker() if checks is not None else None
        self.prices = prices
        #: the retry rounds' money rules: a systematic failure is not retried, every round is budgeted
        self.rules = RoundRules(self.work, checks, self.checker, max_cost_usd=max_cost_usd, noun="record")
        self.jobs: dict[tuple[int, int], JobRef] = {}
        #: ``(shard, round)`` pairs staged and waiting for a job
        self.todo: list[tuple[int, int]] = [(s, 0) for s in range(len(plan.shards))]
        #: records of the output files that could not be read (file, line)
        self.unreadable: list[str] = []
        self.counts = {"created": 0, "reattached": 0, "padding": 0}

    # -- paths ------------------------------------------------------------------------------------------------

    def work(self, *names: str) -> Any:
        path = as_path(self.plan.staging)
        for name in names:
            path = join_path(path, name)
        return path

    def job_dir(self, shard: int, rnd: int) -> Any:
        return self.work(f"s{shard:05d}-r{rnd}")

    def job_name(self, shard: int, rnd: int) -> str:
        return f"synth-{self.plan.key[:24]}-s{shard}-r{rnd}"

    def token(self, shard: int, rnd: int) -> str:
        return f"synth{self.plan.key}s{shard}r{rnd}"

    # -- staging ----------------------------------------------------------------------------------------------

    def write_job_files(self, shard: int, rnd: int, requests: list[bytes], inputs: list[dict[str, Any]],
                        smallest: bytes | None) -> int:
        """Write a job's OpenAI lines and its Bedrock records (with padding up to the minimum when the plan
        pads); return the padding records added."""
        folder = self.job_dir(shard, rnd)
        with open_path(join_path(folder, "requests.jsonl"), "wb") as fp:
            fp.write(b"".join(r + b"\n" for r in requests))
        pads = max(0, self.limits.min_records - len(inputs)) if self.plan.pad_to_minimum else 0
        with open_path(join_path(folder, "records.jsonl"), "wb") as fp:
            for i, body in enumerate(inputs):
                fp.write(orjson.dumps({"recordId": record_id(i), "modelInput": body}) + b"\n")
            if pads and smallest is not None:
                pad = _pad_input(smallest)
                for i in range(pads):
                    fp.write(orjson.dumps({"recordId": f"P{i:010d}", "modelInput": pad}) + b"\n")
        if pads:
            self.plan.padding[f"{shard}-{rnd}"] = pads
            log.info("shard %d round %d: %d padding record(s) bring the job to Bedrock's minimum of %d", shard, rnd,
                     pads, self.limits.min_records)
        return pads

    # -- the contract -----------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Take up every job the run recorded (any try, any worker), with its current state."""
        assert self.hook is not None
        for rec in self._recorded():
            ref = (int(rec["shard"]), int(rec["round"]))
            state = self._state(self.hook.get_job(rec["job_arn"]))
            self.jobs[ref] = JobRef(ref[0], ref[1], rec["job_arn"], state, float(rec["created_at"]))
        self.todo = sorted(p for p in self._staged_rounds() if p not in self.jobs)

    def _staged_rounds(self) -> Iterator[tuple[int, int]]:
        for name in list_names(self.work()):
            if name.startswith("s") and "-r" in name:
                shard, rnd = name[1:].split("-r")
                if exists(join_path(self.work(name), "records.jsonl")):
                    yield int(shard), int(rnd)

    def submit(self) -> list[str]:
        """Create a job for every staged ``(shard, round)`` without one; the token makes a repeated create
        (a lost response, a retried task) return the job created first. Returns the ARNs new to this try."""
        assert self.hook is not None
        created: list[str] = []
        for shard, rnd in list(self.todo):
            if self.max_active_jobs is not None and len(self.running) >= self.max_active_jobs:
                log.info("%d Bedrock job(s) running (max_active_jobs=%d): %d wait for them", len(self.running),
                         self.max_active_jobs, len(self.todo))
                break
            name = self.job_name(shard, rnd)
            # a job an earlier try created but never recorded (it died in between): found by its name; the
            # token covers the rest (a create whose response was lost, a list that lags)
            earlier = [j["jobArn"] for j in self.hook.find_jobs(name) if j.get("jobName") == name]
            arn = earlier[0] if earlier else self.hook.create_job(
                job_name=name, role_arn=self.plan.role_arn, model_id=self.plan.model_id,
                input_uri=s3_uri(join_path(self.job_dir(shard, rnd), "records.jsonl")),
                output_uri=s3_uri(join_path(self.job_dir(shard, rnd), "out")) + "/",
                client_request_token=self.token(shard, rnd), timeout_hours=self.plan.timeout_hours,
                tags={"created_by": TAG_CREATED_BY, "synth_key": self.plan.key})
            state = self._state(self.hook.get_job(arn))
            self.jobs[(shard, rnd)] = JobRef(shard, rnd, arn, state, time.time())
            self._record()
            self.todo.remove((shard, rnd))
            if earlier:
                self.counts["reattached"] += 1
                log.info("shard %d round %d: re-attached to Bedrock job %s (%s) of an earlier try", shard, rnd,
                         arn, state["status"])
            else:
                self.counts["created"] += 1
                created.append(arn)
                log.info("shard %d round %d: created Bedrock job %s", shard, rnd, arn)
        return created

    def states(self) -> dict[str, str | None]:
        return {ref.job_arn: ref.state.get("status") for _, ref in sorted(self.jobs.items())}

    def poll(self) -> list[tuple[str, BaseException]]:
        assert self.hook is not None
        errors: list[tuple[str, BaseException]] = []
        for ref in self.jobs.values():
            if ref.finished:
                continue
            try:
                ref.state = self._state(self.hook.get_job(ref.job_arn))
            except Exception as error:
                errors.append((ref.job_arn, error))
        return errors

    def is_transient(self, error: BaseException) -> bool:
        from airflow_provider_synth.hooks.bedrock import is_transient

        return is_transient(error)

    def refresh(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Take the final states a trigger event carries."""
        for ref in self.jobs.values():
            state = states.get(ref.job_arn)
            if state and JOB_PHASES.get(state.get("status"), False):
                ref.state = dict(state)

    def cancel(self) -> list[str]:
        """``StopModelInvocationJob`` on every job still running; a failing stop is logged, not raised."""
        assert self.hook is not None
        stopped = []
        for ref in self.jobs.values():
            if ref.finished or ref.state.get("status") == "Stopping":
                continue
            try:
                self.hook.stop_job(ref.job_arn)
                stopped.append(ref.job_arn)
                log.info("Stopped Bedrock job %s", ref.job_arn)
            except Exception as exc:
                log.warning("Stopping Bedrock job %s failed: %s", ref.job_arn, exc)
        return stopped

    @property
    def output_dir(self) -> Any:
        return as_path(self.plan.output_dir)

    @property
    def started_at(self) -> float | None:
        return self.first_created_at

    def next_round(self) -> list[tuple[int, int]]:
        """Stage, per shard whose last job finished, a follow-up job of only the records a retry can fix (less
        a kind of unusable answer found systematic, and only within ``max_cost_usd``:
        :mod:`~airflow_provider_synth.runs.rounds`); return the ``(shard, round)`` pairs staged and not
        submitted yet. A round below Bedrock's minimum is padded (``pad_to_minimum``) or left out, its records
        staying failures."""
        keep = RoundRules.keep(retry_worthy, self.rules.stopped_kinds(finished_rounds(self._ended_shards())))
        planned: list[tuple[int, int, list[bytes]]] = []
        for shard in range(len(self.plan.shards)):
            last = max([r for (s, r) in self.jobs if s == shard], default=-1)
            ref = self.jobs.get((shard, last))
            if ref is None or not ref.finished or last >= self.max_rounds or (shard, last + 1) in self.todo:
                continue
            lines = self._pending(shard, keep)
            if not lines:
                continue
            if len(lines) < self.limits.min_records and not self.plan.pad_to_minimum:
                log.warning("shard %d: %d record(s) could be retried, below Bedrock's minimum of %d records per "
                            "job: they stay failures (pad_to_minimum=True pads a retry job)", shard, len(lines),
                            self.limits.min_records)
                continue
            planned.append((shard, last + 1, lines))
        if planned and not self.rules.within_budget([(s, r) for s, r, _ in planned], self._estimate(planned),
                                                    before=self.plan.est_cost_usd):
            planned = []
        for shard, rnd, lines in planned:
            inputs = [to_record(self.family, "", self.plan.endpoint, loads(raw)["body"])["modelInput"]
                      for raw in lines]
            smallest = min((orjson.dumps(i) for i in inputs), key=len)
            self.write_job_files(shard, rnd, lines, inputs, smallest)
            self.plan.save()
            self.todo.append((shard, rnd))
            log.info("shard %d: %d record(s) to retry in round %d", shard, len(lines), rnd)
        return list(self.todo)

    def _ended_shards(self) -> Iterator[tuple[list[Any], list[int], int]]:
        """Per shard whose last job finished: its answer files, their rounds and the last round."""
        for shard in range(len(self.plan.shards)):
            last = max([r for (s, r) in self.jobs if s == shard], default=-1)
            ref = self.jobs.get((shard, last))
            if ref is not None and ref.finished:
                yield (*self._answers_of(shard), last)

    def _estimate(self, planned: list[tuple[int, int, list[bytes]]]) -> RoundEstimate:
        """The retry rounds' records, estimated as round 0 was (tokens at Bedrock's batch prices)."""
        prices = prices_for(self.plan.model_id, self.prices)
        return RoundEstimate.of_lines((raw for _, _, lines in planned for raw in lines),
                                      lambda t_in, t_out: estimate_cost(t_in, t_out, self.plan.model_id, prices))

    def systematic_message(self) -> str | None:
        return self.rules.systematic_message()

    def _pending(self, shard: int, keep: Any = retry_worthy) -> list[bytes]:
        import io

        buf = io.BytesIO()
        pending_requests(join_path(self.job_dir(shard, 0), "requests.jsonl"), self._answers_of(shard)[0], buf,
                         retryable_only=False, keep=keep, checks=self.checker)
        return [raw for _, raw in iter_jsonl(io.BytesIO(buf.getvalue()))]

    def collect(self) -> Accounting:
        """Merge every finished job's answers into the output folder; the accounting, checked."""
        out = output_paths(as_path(self.plan.output_dir))
        shards = [ShardOutputs(join_path(self.job_dir(s, 0), "requests.jsonl"), *self._answers_of(s))
                  for s in range(len(self.plan.shards))]
        invalid = self.work(INVALID_FILE) if self.plan.invalid else None
        with open_path(out["results_path"], "wb") as rf, open_path(out["failures_path"], "wb") as ff:
            return merge_shards(shards, rf, ff, self.checker, invalid=invalid)

    # -- reading back -----------------------------------------------------------------------------------------

    def _answers_of(self, shard: int) -> tuple[list[Any], list[int]]:
        files, rounds = [], []
        for (s, rnd), ref in sorted(self.jobs.items()):
            if s != shard or not ref.finished:
                continue
            files.append(self._answers(ref))
            rounds.append(rnd)
        return files, rounds

    def _answers(self, ref: JobRef) -> Any:
        """The job's answers as OpenAI output lines (written once, from Bedrock's ``.jsonl.out``)."""
        dest = join_path(self.job_dir(ref.shard, ref.round), "answers.jsonl")
        if exists(dest):
            return dest
        ids = self._custom_ids(ref.shard, ref.round)
        answered: set[int] = set()
        lines: list[bytes] = []
        manifest: dict[str, Any] = {}
        folder = join_path(join_path(self.job_dir(ref.shard, ref.round), "out"), ref.job_arn.rsplit("/", 1)[-1])
        for name in list_names(folder):
            path = join_path(folder, name)
            if name == "manifest.json.out":
                with open_path(path, "rb") as fp:
                    manifest = loads(fp.read())
            elif name.endswith(".jsonl.out"):
                lines += self._read_output(path, ids, answered)
        code = NO_OUTPUT_CODES.get(str(ref.state.get("status")))
        if code is not None:
            message = f"Bedrock job {ref.job_arn} ended {ref.state.get('status')}: " + (
                ref.state.get("message") or "no output for this record")
            lines += [error_line(cid, code, message) for i, cid in enumerate(ids) if i not in answered]
        self._check_count(ref, manifest, len(answered))
        with open_path(dest, "wb") as fp:
            fp.write(b"".join(line + b"\n" for line in lines))
        with open_path(join_path(self.job_dir(ref.shard, ref.round), "bedrock_manifest.json"), "wb") as fp:
            fp.write(orjson.dumps(manifest))
        return dest

    def _read_output(self, path: Any, ids: list[str], answered: set[int]) -> list[bytes]:
        lines = []
        with open_path(path, "rb") as fp:
            for lineno, raw in iter_jsonl(fp):
                try:
                    record = loads(raw)
                    index = record_index(str(record.get("recordId")))
                except (ValueError, TypeError, AttributeError):
                    self.unreadable.append(f"{path}:{lineno}")
                    continue
                if index is None:  # a padding record (or one this run never wrote)
                    self.counts["padding"] += 1
                    continue
                if index >= len(ids) or index in answered:
                    self.unreadable.append(f"{path}:{lineno}")
                    continue
                answered.add(index)
                lines.append(output_line(self.family, ids[index], self.plan.model_id, record))
        if self.unreadable:
            log.warning("%d Bedrock output line(s) could not be read (their records count as missing and are "
                        "retried): %s", len(self.unreadable), ", ".join(self.unreadable[:5]))
        return lines

    def _check_count(self, ref: JobRef, manifest: Mapping[str, Any], answered: int) -> None:
        expected = manifest.get("processedRecordCount")
        pads = self.plan.padding.get(f"{ref.shard}-{ref.round}", 0)
        if expected is not None and int(expected) - pads > answered:
            log.warning("Bedrock job %s: its manifest counts %s processed records, %d came back readable; the "
                        "rest count as missing", ref.job_arn, expected, answered + pads)

    def _custom_ids(self, shard: int, rnd: int) -> list[str]:
        from airflow_provider_synth.batch.merge import request_custom_id

        with open_path(join_path(self.job_dir(shard, rnd), "requests.jsonl"), "rb") as fp:
            return [request_custom_id(raw) for _, raw in iter_jsonl(fp)]

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def _state(self, job: Mapping[str, Any]) -> dict[str, Any]:
        from airflow_provider_synth.hooks.bedrock import job_state

        return job_state(job)

    def _recorded(self) -> list[dict[str, Any]]:
        path = self.work(JOBS_FILE)
        if not exists(path):
            return []
        with open_path(path, "rb") as fp:
            data: list[dict[str, Any]] = loads(fp.read())
        return data

    def _record(self) -> None:
        rows = [{"shard": s, "round": r, "job_arn": j.job_arn, "created_at": j.created_at}
                for (s, r), j in sorted(self.jobs.items())]
        with open_path(self.work(JOBS_FILE), "wb") as fp:
            fp.write(orjson.dumps(rows))

    @property
    def first_created_at(self) -> float | None:
        return min((j.created_at for j in self.jobs.values()), default=None)

    def bedrock_tokens(self) -> dict[str, int]:
        """Input and output tokens over every finished job's ``manifest.json.out``."""
        totals = {"input_tokens": 0, "output_tokens": 0}
        for ref in self.jobs.values():
            path = join_path(self.job_dir(ref.shard, ref.round), "bedrock_manifest.json")
            if ref.finished and exists(path):
                with open_path(path, "rb") as fp:
                    data = loads(fp.read())
                totals["input_tokens"] += int(data.get("inputTokenCount") or 0)
                totals["output_tokens"] += int(data.get("outputTokenCount") or 0)
        return totals

    def cost(self, acct: Accounting) -> float | None:
        """Every answer billed (results and answers the checks refused) at Bedrock's batch price (half the
        on-demand one); for a family without per-record usage (Mistral), the jobs' manifest totals."""
        prices = prices_for(self.plan.model_id, self.prices)
        if self.family.per_record_usage:
            billed = Usage().add(acct.usage).add(acct.unusable_usage)
        else:
            tokens = self.bedrock_tokens()
            billed = Usage(prompt_tokens=tokens["input_tokens"], completion_tokens=tokens["output_tokens"])
        return cost_usd(billed, self.plan.model_id, prices)

    def manifest(self, acct: Accounting | None, status: str, **fields: Any) -> dict[str, Any]:
        """The run's manifest: the accounting, the jobs, cost, and ``fields`` (who wrote it)."""
        plan = self.plan
        return build_manifest(
            backend=self.backend, accounting=acct.as_dict() if acct is not None else {"total": plan.total},
            output_dir=plan.output_dir, status=status, model=plan.model_id,
            family=plan.family, endpoint=plan.endpoint, job_arns=[j.job_arn for _, j in sorted(self.jobs.items())],
            jobs={j.job_arn: {"shard": s, "round": r, "status": j.state.get("status"),
                              "message": j.state.get("message")} for (s, r), j in sorted(self.jobs.items())},
            shards=len(plan.shards), rounds=max((r for _, r in self.jobs), default=0) + 1, idempotency_key=plan.key,
            staging=plan.staging, conn_id=plan.conn_id, padding_records=sum(plan.padding.values()),
            bedrock_tokens=self.bedrock_tokens(), unreadable_output_lines=len(self.unreadable),
            cost_usd=self.cost(acct) if acct is not None else None, **fields)

    def failure_hints(self, acct: Accounting) -> list[str]:
        hints = []
        failed = [j for j in self.jobs.values() if j.state.get("status") == "Failed"]
        if failed:
            hints.append(f"{len(failed)} Bedrock job(s) failed: {failed[0].state.get('message') or 'no message'} "
                         "(check the role's S3 and Bedrock permissions, the model's access and quotas); their "
                         "records are final failures.")
        if acct.retryable:
            hints.append(f"{acct.retryable} failure(s) were retryable but the retry rounds "
                         f"(retry_failed_requests={self.max_rounds}) are spent or a round fell below Bedrock's "
                         "minimum records (pad_to_minimum=True pads it); a retry of the task runs them again.")
        return hints
