"""The state of one Anthropic Message Batches run: plan, submit with an intent first, re-attach, rounds, collect.

A run is one task instance's input, translated (:mod:`~airflow_provider_synth.runs.anthropic_messages`) and
split into shards of at most 100,000 requests and 256 MB. Round 0 submits every shard; each later round
resubmits, per shard, only what a retry can fix: ``errored`` results of ``api_error``, ``overloaded_error``,
rate limits (429, 5xx) and ``expired`` ones, plus unusable answers the output checks retry. ``invalid_request_error``
is final.

Message Batches carry no metadata, so the run keeps its own record in the work folder: before each create it
writes an *intent* (shard, round, number of requests, time), after it the batch id. A try that crashed between
the two finds its batch by what the API shows: a batch created after the intent (within the clock slack) with
exactly that many requests, not claimed by another intent of the run. What that can cost is one shard's batch
paid twice, and only when the API's list does not show the batch yet (docs/operators/anthropic.md).

This module orchestrates the hook and the core; it holds no Airflow context.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Any

import msgspec
import orjson

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.batch.jsonl import iter_jsonl, loads
from airflow_provider_synth.batch.keys import InputDigest
from airflow_provider_synth.batch.landing import landing
from airflow_provider_synth.batch.manifest import build_manifest, output_paths
from airflow_provider_synth.batch.merge import Accounting, ShardOutputs, merge_shards, pending_requests
from airflow_provider_synth.batch.paths import exists, join_path, local_path, open_path, path_url
from airflow_provider_synth.batch.results import ParsedOutput
from airflow_provider_synth.batch.split import ShardInfo, ShardLimits
from airflow_provider_synth.batch.usage import (
    Price,
    Usage,
    count_text_tokens,
    declared_output_tokens,
    estimate_request_tokens,
)
from airflow_provider_synth.exceptions import BatchFailedError
from airflow_provider_synth.hooks.anthropic import MESSAGE_BATCHES, batch_state, is_transient
from airflow_provider_synth.runs.anthropic_messages import (
    MAX_BATCH_BYTES,
    MAX_BATCH_REQUESTS,
    Request,
    Translated,
    Translation,
    anthropic_cost,
    result_lines,
)
from airflow_provider_synth.runs.base import RunIdentity, ShardedWork, SynthRun
from airflow_provider_synth.runs.rounds import RoundEstimate, RoundRules, finished_rounds

if TYPE_CHECKING:
    from airflow_provider_synth.hooks.anthropic import AnthropicBatchHook

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
#: the run's own record of its batches: ``[{shard, round, requests, at, batch_id}]``, an intent written before
#: each create and completed with the batch id after it
INTENTS_FILE = "intents.json"
#: how far a batch's ``created_at`` may fall before its intent's time (the service's clock against the worker's)
CLOCK_SLACK_S = 300.0
#: The limits of one Message Batch.
ANTHROPIC_LIMITS = ShardLimits(max_requests=MAX_BATCH_REQUESTS, max_bytes=MAX_BATCH_BYTES)


def anthropic_run_key(identity: RunIdentity, fingerprint: str) -> str:
    """The run's key: the same task instance over the same (translated) input always gets the same key (the
    separator and length are pinned: changing them would orphan earlier runs)."""
    return identity.run_key("anthropic", fingerprint, sep="|", length=32)


def retry_worthy(out: ParsedOutput) -> bool:
    """Failures a new round can fix (429, 5xx, expired, unusable answers the checks retry); ``batch_cancelled``
    too, since only this task (kill, timeout) cancels its batches. Never ``invalid_request_error``."""
    return out.retryable or out.error_code == "batch_cancelled"


@dataclass
class AnthropicPlan:
    """What was submitted, written to ``<work_dir>/plan.json`` before the first create."""

    key: str
    conn_id: str
    model: str | None
    api_version: str
    work_dir: str
    output_dir: str
    shards: list[dict[str, Any]]
    total: int
    fingerprint: str
    translation: dict[str, Any]
    est_input_tokens: int = 0
    est_output_tokens: int = 0
    est_cost_usd: float | None = None
    created_at: float = field(default_factory=time.time)
    checks: dict[str, Any] | None = None
    #: body fields left out under ``sampling="drop"`` (field -> lines)
    dropped: dict[str, int] = field(default_factory=dict)
    #: user custom_ids that break Anthropic's rule, sent under a mapped id
    mapped_ids: int = 0
    prices: dict[str, list[float]] = field(default_factory=dict)

    def save(self) -> None:
        with open_path(join_path(self.work_dir, PLAN_FILE), "wb") as fp:
            fp.write(orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, work_dir: Any) -> AnthropicPlan:
        with open_path(join_path(work_dir, PLAN_FILE), "rb") as fp:
            return cls(**loads(fp.read()))


# -- planning ----------------------------------------------------------------------------------------------------


class _Shards:
    """Writes translated requests into shard files within the limits, in input order."""

    def __init__(self, work: Any, limits: ShardLimits) -> None:
        self.work, self.limits = work, limits
        self.infos: list[ShardInfo] = []
        self.fp: IO[bytes] | None = None
        self.digest = InputDigest()

    def write(self, lineno: int, req: Request, tokens: int) -> None:
        line = orjson.dumps({"custom_id": req.custom_id, "anthropic_id": req.anthropic_id, "params": req.params})
        size = len(line) + 1
        if size > self.limits.max_bytes:
            raise ValueError(f"request {req.custom_id!r} (line {lineno}) is {size:,} bytes, over a batch's "
                             f"{self.limits.max_bytes:,}")
        cur = self.infos[-1] if self.infos else None
        if cur is None or cur.requests >= self.limits.max_requests or cur.bytes + size > self.limits.max_bytes:
            self.close()
            cur = ShardInfo(index=len(self.infos), first_line=lineno, first_custom_id=req.custom_id)
            self.infos.append(cur)
            self.fp = open_path(join_path(self.work, f"shards/shard-{cur.index:05d}-r0.jsonl"), "wb")
        assert self.fp is not None
        self.fp.write(line + b"\n")
        self.digest.line(line)
        cur.requests += 1
        cur.bytes += size
        cur.est_tokens += tokens
        cur.last_line, cur.last_custom_id = lineno, req.custom_id

    def close(self) -> None:
        if self.fp is not None:
            self.fp.close()
            self.fp = None


def _numbered(source: Any) -> Iterator[tuple[int, bytes]]:
    with open_path(source, "rb") as fp:
        yield from iter_jsonl(fp)


def _tokens(params: Mapping[str, Any]) -> tuple[int, int]:
    """A request's estimated input tokens (the system prompt too) and the output tokens it may produce."""
    system = params.get("system")
    text = system if isinstance(system, str) else "".join(
        b.get("text", "") for b in system or () if isinstance(b, Mapping))
    return estimate_request_tokens(params) + count_text_tokens(text), declared_output_tokens(params)


def plan_run(source: Any, *, work_dir: Any, output_dir: Any, conn_id: str, identity: RunIdentity,
             options: Translation, limits: ShardLimits = ANTHROPIC_LIMITS, checks: OutputChecks | None = None,
             prices: Mapping[str, Price | tuple[float, float, float]] | None = None) -> AnthropicPlan:
    """Translate ``source`` (a JSONL path) into shards and the plan; nothing is sent. Every line that cannot be
    translated is reported at once (file, line, custom_id) before anything can be paid for.

    :param identity: the task instance.
    :raises InvalidRequestsError: the lines that cannot be sent.
    """
    limits = ShardLimits(max_requests=min(limits.max_requests, MAX_BATCH_REQUESTS),
                         max_bytes=min(limits.max_bytes, MAX_BATCH_BYTES))
    shards, summary = _Shards(work_dir, limits), Translated()
    est_in = est_out = 0
    models: set[str] = set()
    try:
        for n, req in enumerate(_translated(source, options, summary), start=1):
            tokens_in, tokens_out = _tokens(req.params)
            est_in, est_out = est_in + tokens_in, est_out + tokens_out
            models.add(str(req.params.get("model")))
            shards.write(n, req, tokens_in)
    finally:
        shards.close()
    if not shards.infos:
        raise ValueError(f"{source}: no requests to send")
    fingerprint = shards.digest.hexdigest()
    model = next(iter(models)) if len(models) == 1 else None
    table = {k: list(v) for k, v in (prices or {}).items()}
    est = None
    if model is not None:
        est = anthropic_cost(Usage(prompt_tokens=est_in, completion_tokens=est_out), 0, model, prices)
    return AnthropicPlan(
        key=anthropic_run_key(identity, fingerprint), conn_id=conn_id, model=model,
        api_version=options.api_version, work_dir=path_url(work_dir), output_dir=path_url(output_dir),
        shards=[s.as_dict() for s in shards.infos], total=summary.total, fingerprint=fingerprint,
        translation=asdict(options), est_input_tokens=est_in, est_output_tokens=est_out, est_cost_usd=est,
        checks=checks.to_spec() if checks is not None else None, dropped=summary.dropped,
        mapped_ids=summary.mapped_ids, prices=table)


def _translated(source: Any, options: Translation, summary: Translated) -> Iterator[Request]:
    from airflow_provider_synth.runs.anthropic_messages import translate_lines

    yield from translate_lines(_numbered(source), str(source), options, summary)


# -- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Intent:
    """One (shard, round) the run creates a batch for: recorded before the create, completed after it."""

    shard: int
    round: int
    requests: int
    at: float
    batch_id: str | None = None


class _Usage(msgspec.Struct):
    cache_creation_input_tokens: int | None = None


class _Body(msgspec.Struct):
    usage: _Usage | None = None


class _Resp(msgspec.Struct):
    body: _Body | None = None


class _Row(msgspec.Struct):
    response: _Resp | None = None


_row = msgspec.json.Decoder(_Row)


class AnthropicRun(ShardedWork, SynthRun):
    """Submit, re-attach, poll, cancel, run the retry rounds and collect the batches of one run.

    :param hook: the sync hook of the run's connection.
    :param plan: the run's plan.
    :param path_factory: turns a stored path string back into a path object (``as_path``).
    :param checks: output checks (default: the plan's).
    :param max_rounds: retry rounds (``retry_failed_requests``).
    :param max_cost_usd: the budget every retry round is estimated against before it is submitted.
    """

    backend = "anthropic"
    waited = MESSAGE_BATCHES

    def __init__(self, hook: AnthropicBatchHook, plan: AnthropicPlan, path_factory: Any = None,
                 checks: OutputChecks | None = None, max_rounds: int = 2, max_cost_usd: float | None = None) -> None:
        self.hook, self.plan = hook, plan
        self._path = path_factory or (lambda p: p)
        checks = checks if checks is not None else OutputChecks.from_spec(plan.checks)
        self.checker = checks.checker() if checks is not None else None
        self.max_rounds = max_rounds
        #: the retry rounds' money rules: a systematic failure is not retried, every round is budgeted
        self.rules = RoundRules(self._work, checks, self.checker, max_cost_usd=max_cost_usd)
        self.intents: list[Intent] = []
        self.states_by_id: dict[str, dict[str, Any]] = {}
        self.todo: list[tuple[int, int]] = []

    # -- paths ------------------------------------------------------------------------------------------------

    def _output(self, shard: int, rnd: int) -> Any:
        return self._work("outputs", f"shard-{shard:05d}-r{rnd}.jsonl")

    @property
    def output_dir(self) -> Any:
        return self._path(self.plan.output_dir)

    # -- the record -------------------------------------------------------------------------------------------

    def _load_intents(self) -> list[Intent]:
        try:
            with open_path(self._work(INTENTS_FILE), "rb") as fp:
                return [Intent(**row) for row in loads(fp.read())]
        except (FileNotFoundError, OSError):
            return []

    def _save_intents(self) -> None:
        with open_path(self._work(INTENTS_FILE), "wb") as fp:
            fp.write(orjson.dumps([asdict(i) for i in self.intents]))

    def where(self) -> str:
        return f"{self.hook.base_url} (connection {self.hook.conn_id!r})"

    def attach(self) -> None:
        """Take up what any earlier try created: recorded batches by id; an intent a crash left without an id
        by what the API shows (created after the intent, as many requests, claimed by no other intent)."""
        self.intents = self._load_intents()
        for intent in self.intents:
            if intent.batch_id is not None:
                self.states_by_id[intent.batch_id] = batch_state(self.hook.get_batch(intent.batch_id))
        orphans = [i for i in self.intents if i.batch_id is None]
        if orphans:
            self._adopt(orphans)

    def _adopt(self, orphans: list[Intent]) -> None:
        claimed = {i.batch_id for i in self.intents if i.batch_id}
        since = min(i.at for i in orphans) - CLOCK_SLACK_S
        seen = [b for b in self.hook.list_batches(created_after=since) if b.id not in claimed]
        for intent in sorted(orphans, key=lambda i: i.at):
            fits = [b for b in seen if batch_state(b)["request_counts"]["total"] == intent.requests
                    and b.created_at.timestamp() >= intent.at - CLOCK_SLACK_S]
            if not fits:
                log.warning("shard %d round %d: a try recorded the intent to create a batch of %d request(s) at %s "
                            "but no batch id, and %s shows no such batch: it was not created; submitting it",
                            intent.shard, intent.round, intent.requests, time.ctime(intent.at), self.where())
                self.intents.remove(intent)
                continue
            best = min(fits, key=lambda b: abs(b.created_at.timestamp() - intent.at))
            if len(fits) > 1:
                log.warning("shard %d round %d: %d batches fit the unrecorded intent (%s); taking %s, the nearest "
                            "in time", intent.shard, intent.round, len(fits), ", ".join(b.id for b in fits), best.id)
            intent.batch_id = best.id
            seen.remove(best)
            self.states_by_id[best.id] = batch_state(best)
            log.info("shard %d round %d: re-attached to batch %s, created before a crash could record it",
                     intent.shard, intent.round, best.id)
        self._save_intents()

    def refresh(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Take the final states a trigger event carries."""
        for batch_id, state in states.items():
            if batch_id in self.states_by_id and state and state.get("status"):
                self.states_by_id[batch_id] = dict(state)

    # -- the contract's steps ---------------------------------------------------------------------------------

    def _intent(self, shard: int, rnd: int) -> Intent | None:
        return next((i for i in self.intents if (i.shard, i.round) == (shard, rnd)), None)

    def _last_round(self, shard: int) -> int:
        return max((i.round for i in self.intents if i.shard == shard), default=-1)

    @property
    def started_at(self) -> float | None:
        return min((i.at for i in self.intents), default=None)

    @property
    def batch_ids(self) -> list[str]:
        return [i.batch_id for i in sorted(self.intents, key=lambda i: (i.shard, i.round)) if i.batch_id]

    def states(self) -> dict[str, str | None]:
        """Every batch of the run -> its ``processing_status``."""
        return {b: self.states_by_id.get(b, {}).get("status") for b in self.batch_ids}

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    def submit(self) -> list[str]:
        """Create the batches of the planned (shard, round) pairs not created yet: intent first, then the
        create, then the id. Returns the new batch ids."""
        created = []
        for shard, rnd in self.todo:
            if self._intent(shard, rnd) is not None:
                continue
            with open_path(self.shard_input(shard, rnd), "rb") as fp:
                rows = [loads(raw) for _, raw in iter_jsonl(fp)]
            intent = Intent(shard, rnd, len(rows), time.time())
            self.intents.append(intent)
            self._save_intents()
            batch = self.hook.create_batch([{"custom_id": r["anthropic_id"], "params": r["params"]} for r in rows])
            intent.batch_id = batch.id
            self._save_intents()
            self.states_by_id[batch.id] = batch_state(batch)
            created.append(batch.id)
            log.info("shard %d round %d: submitted message batch %s (%d requests)", shard, rnd, batch.id, len(rows))
        self.todo = []
        return created

    def poll(self) -> list[tuple[str, BaseException]]:
        errors: list[tuple[str, BaseException]] = []
        for batch_id in self.running:
            try:
                self.states_by_id[batch_id] = batch_state(self.hook.get_batch(batch_id))
            except Exception as error:
                errors.append((batch_id, error))
        return errors

    def cancel(self) -> list[str]:
        cancelled = []
        for batch_id in self.running:
            try:
                self.states_by_id[batch_id] = batch_state(self.hook.cancel_batch(batch_id))
                cancelled.append(batch_id)
                log.info("cancelled message batch %s", batch_id)
            except Exception as exc:  # best effort: log, never raise
                log.warning("could not cancel message batch %s: %s", batch_id, type(exc).__name__)
        return cancelled

    def next_round(self) -> list[tuple[int, int]]:
        """Plan what :meth:`submit` sends next: round 0 of shards not submitted yet; for a shard whose last
        batch ended, a retry round of only the requests a retry can fix (up to ``max_rounds``), less a kind of
        unusable answer found systematic, and only within ``max_cost_usd`` (:mod:`~airflow_provider_synth.runs.rounds`)."""
        todo = []
        keep = RoundRules.keep(retry_worthy, self.rules.stopped_kinds(finished_rounds(self._ended_shards())))
        for shard in range(len(self.plan.shards)):
            last = self._last_round(shard)
            if last < 0:
                todo.append((shard, 0))
                continue
            intent = self._intent(shard, last)
            if intent is None or intent.batch_id in self.running or last >= self.max_rounds:
                continue
            path = self.shard_input(shard, last + 1)
            with open_path(path, "wb") as out:
                n = pending_requests(self.shard_input(shard, 0), self._outputs_of(shard)[0], out,
                                     retryable_only=False, keep=keep, checks=self.checker)
            if n:
                _params_changes(path)
                log.info("shard %d: %d request(s) to retry in round %d", shard, n, last + 1)
                todo.append((shard, last + 1))
        retry = [t for t in todo if t[1] > 0]
        if retry and not self.rules.within_budget(retry, self._estimate(retry), before=self.plan.est_cost_usd):
            todo = [t for t in todo if t not in retry]
        self.todo = todo
        return todo

    def _ended_shards(self) -> Iterator[tuple[list[Any], list[int], int]]:
        """Per shard whose last batch ended: its output files, their rounds and the last round."""
        for shard in range(len(self.plan.shards)):
            intent = self._intent(shard, last := self._last_round(shard))
            if intent is not None and intent.batch_id and intent.batch_id not in self.running:
                yield (*self._outputs_of(shard), last)

    def _estimate(self, retry: list[tuple[int, int]]) -> RoundEstimate:
        """The retry rounds' requests, estimated as round 0 was (tokens, then Message Batches prices)."""
        tokens_in = tokens_out = n = 0
        for shard, rnd in retry:
            with open_path(self.shard_input(shard, rnd), "rb") as fp:
                for _, raw in iter_jsonl(fp):
                    t_in, t_out = _tokens(loads(raw)["params"])
                    tokens_in, tokens_out, n = tokens_in + t_in, tokens_out + t_out, n + 1
        prices = {k: (v[0], v[1], v[2]) for k, v in self.plan.prices.items()}
        cost = None if self.plan.model is None else anthropic_cost(
            Usage(prompt_tokens=tokens_in, completion_tokens=tokens_out), 0, self.plan.model, prices)
        return RoundEstimate(n, tokens_in, tokens_out, cost)

    def systematic_message(self) -> str | None:
        return self.rules.systematic_message()

    # -- results ----------------------------------------------------------------------------------------------

    def _outputs_of(self, shard: int) -> tuple[list[Any], list[int]]:
        """The landed output file of each of the shard's ended rounds (downloaded and landed once)."""
        files, rounds = [], []
        for intent in sorted((i for i in self.intents if i.shard == shard), key=lambda i: i.round):
            state = self.states_by_id.get(intent.batch_id or "", {})
            if state.get("status") != "ended":
                continue
            dest = self._output(shard, intent.round)
            if not exists(dest):
                self._land(intent, dest, int(state["request_counts"]["total"]))
            files.append(dest)
            rounds.append(intent.round)
        return files, rounds

    def _land(self, intent: Intent, dest: Any, total: int) -> None:
        """Download a batch's results, check them (one line per request), turn them into output lines with the
        users' ids and write them under a temporary name, then rename: a landed file is always whole."""
        assert intent.batch_id is not None
        raw = self._work("outputs", f"shard-{intent.shard:05d}-r{intent.round}.results.part")
        _, lines = self.hook.download_results(intent.batch_id, raw)
        if lines != total:
            raise BatchFailedError(f"message batch {intent.batch_id}: its results hold {lines} line(s) for {total} "
                                   f"request(s) ({self.where()}); a retry downloads them again")
        with open_path(self.shard_input(intent.shard, intent.round), "rb") as fp:
            ids = {row["anthropic_id"]: row["custom_id"] for row in (loads(r) for _, r in iter_jsonl(fp))}
        bad = 0
        with open_path(raw, "rb") as src, landing(dest) as out:  # whole or not at all (batch.landing)
            for line, why in result_lines((r for _, r in iter_jsonl(src)), ids, str(intent.batch_id)):
                if line is None:
                    bad += 1  # the request stays unanswered: missing, so retried
                    log.warning("%s", why)
                else:
                    out.write(line + b"\n")
        if bad == lines and lines:
            raise BatchFailedError(f"message batch {intent.batch_id} holds none of the requests of shard "
                                   f"{intent.shard} round {intent.round}: it is not this run's (a crash left its "
                                   f"intent unrecorded and another batch of {total} requests was taken). Delete "
                                   f"{self._work(INTENTS_FILE)} entry for it and retry.")
        _remove(raw)

    def collect(self) -> Accounting:
        """Merge every shard's rounds into ``results.jsonl`` and ``failures.jsonl`` (each lands whole or not at
        all: :func:`~airflow_provider_synth.batch.landing.landing`)."""
        out = output_paths(self.output_dir)
        shards = [ShardOutputs(self.shard_input(i, 0), *self._outputs_of(i)) for i in range(len(self.plan.shards))]
        with landing(out["results_path"]) as rf, landing(out["failures_path"]) as ff:
            return merge_shards(shards, rf, ff, self.checker)

    def cache_creation_tokens(self) -> int:
        """Cache writes of every billed answer (results, and unusable answers kept in failures)."""
        total = 0
        out = output_paths(self.output_dir)
        for key in ("results_path", "failures_path"):
            with open_path(out[key], "rb") as fp:
                for _, raw in iter_jsonl(fp):
                    row = _row.decode(raw)
                    usage = row.response.body.usage if row.response and row.response.body else None
                    total += (usage.cache_creation_input_tokens or 0) if usage is not None else 0
        return total

    def costs(self, acct: Accounting) -> dict[str, Any]:
        """``cost_usd`` of every billed answer at the batch price, cache writes and reads included; the
        estimate's ratio to the actual input tokens."""
        plan = self.plan
        billed = Usage().add(acct.usage).add(acct.unusable_usage)
        creation = self.cache_creation_tokens()
        prices = {k: (v[0], v[1], v[2]) for k, v in plan.prices.items()}
        out: dict[str, Any] = {"cost_usd": anthropic_cost(billed, creation, plan.model, prices),
                               "usage": {**acct.usage.as_dict(), "cache_creation_tokens": creation}}
        if plan.est_input_tokens and acct.succeeded and plan.total:
            expected = plan.est_input_tokens * acct.succeeded / plan.total
            out["input_tokens_ratio"] = round(acct.usage.prompt_tokens / expected, 4)
        return out

    def manifest(self, acct: Accounting | None, status: str, **fields: Any) -> dict[str, Any]:
        plan = self.plan
        extra: dict[str, Any] = {}
        if acct is not None:
            extra.update(self.costs(acct))
        return build_manifest(
            backend=self.backend, accounting=acct.as_dict() if acct is not None else {"total": plan.total},
            output_dir=plan.output_dir, status=status, batch_ids=self.batch_ids, shards=len(plan.shards),
            rounds=max((i.round for i in self.intents), default=0) + 1, idempotency_key=plan.key,
            work_dir=plan.work_dir, conn_id=plan.conn_id, model=plan.model, api_version=plan.api_version,
            est_cost_usd=plan.est_cost_usd, est_input_tokens=plan.est_input_tokens,
            translation={"dropped": plan.dropped, "mapped_ids": plan.mapped_ids}, **{**fields, **extra})

    def failure_hints(self, acct: Accounting) -> list[str]:
        codes = acct.error_codes
        hints = []
        if codes.get("invalid_request_error"):
            hints.append(f"{codes['invalid_request_error']} request(s) were refused as invalid_request_error: a "
                         "retry cannot change that; fix them (their messages are in failures.jsonl).")
        if acct.retryable:
            hints.append(f"{acct.retryable} failure(s) could succeed on retry (raise retry_failed_requests, or "
                         "retry the task: it pays for nothing twice).")
        return hints


def _params_changes(path: Any) -> None:
    """Move the output checks' ``retry_body`` changes (written into a ``body``) into the lines' ``params``."""
    with open_path(path, "rb") as fp:
        rows = [loads(raw) for _, raw in iter_jsonl(fp)]
    if not any("body" in r for r in rows):
        return
    with open_path(path, "wb") as fp:
        for row in rows:
            changes = row.pop("body", None) or {}
            for key, value in changes.items():
                if value is None:
                    row["params"].pop(key, None)
                else:
                    row["params"][key] = value
            fp.write(orjson.dumps(row) + b"\n")


def _remove(path: Any) -> None:
    local = local_path(path)
    if local is not None:
        local.unlink(missing_ok=True)
    else:
        path.unlink(missing_ok=True)
