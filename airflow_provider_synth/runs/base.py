"""The backend contract: what every backend's run provides, and what is written once beside it.

A *run* is one task instance's requests on one backend, from its plan to its accounting. Each backend's run
(:class:`~airflow_provider_synth.runs.openai.BatchRun`, :class:`~airflow_provider_synth.runs.cortex.CortexRun`,
...) subclasses :class:`SynthRun` and provides, through its hook:

========================  ==============================================================================
``prepare`` (its own)     validate and plan the input, idempotently: the same task instance over the same
                          input gets the same plan and run key (:meth:`RunIdentity.run_key`); nothing paid
``attach()``              find what this run submitted already, by any try on any worker (re-attach)
``submit()``              submit what the run still needs and has not submitted; never anything twice
``states()``              every id waited for -> its last known status (the verdict's input)
``poll()``                retrieve every unfinished id through the hook; return the errors, never raise
``is_transient(error)``   the hook's classification of a polling error (network, 429, 5xx)
``cancel()``              cancel what is still running (best effort: log, never raise)
``next_round()``          plan a retry round of only what can succeed (empty: nothing, or no rounds)
``collect()``             merge every answer into the output folder: the core's :class:`Accounting`
``manifest(...)``         the run's manifest (backend, ids, usage, ``cost_usd``)
``settle(ok)``, close()  release what the run holds (Cortex drops its staging tables after a good run)
========================  ==============================================================================

Written once, here, for every backend:

* :meth:`SynthRun.verdict` and :meth:`SynthRun.wait`: THE synchronous wait loop over
  :func:`~airflow_provider_synth.batch.status.verdict` (the operator's worker-side wait, the CLI's ``--wait``);
  the triggers run the same verdict in :class:`~airflow_provider_synth.triggers.base.PollingTrigger`;
* :func:`finish`: write the manifest, apply ``max_failed_ratio`` with THE message, raise THE exception;
* :class:`RunIdentity`: the task instance, for run keys, claims, manifests and query tags alike;
* :class:`Termination`: why a wait ended (the trigger event's ``status``), typed.

Light: standard library and the core only (a trigger's module may import it).
"""

from __future__ import annotations

import abc
import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from airflow_provider_synth.batch.keys import dag_run_key, run_key
from airflow_provider_synth.batch.manifest import output_paths, write_manifest
from airflow_provider_synth.batch.status import (
    BATCHES,
    DEFAULT_MAX_CONSECUTIVE_ERRORS,
    Next,
    PollError,
    Verdict,
    Waited,
)
from airflow_provider_synth.batch.status import verdict as status_verdict
from airflow_provider_synth.batch.usage import Usage, format_usd

if TYPE_CHECKING:
    from airflow_provider_synth.batch.merge import Accounting

log = logging.getLogger(__name__)

#: a polling error as the wait loop carries it: the id polled and what the hook raised
PollErrors = Sequence[tuple[str, BaseException]]


class Termination(enum.Enum):
    """Why a wait ended: the trigger event's ``status``, and the worker-side wait's outcome."""

    SUCCESS = "success"  #: everything waited for finished; the run collects and judges its outcome
    TIMEOUT = "timeout"  #: the run's deadline passed with some still running: cancel, then fail
    ERROR = "error"  #: polling failed (a fatal error, too many transient ones, an unknown status)

    @classmethod
    def of(cls, status: str | None) -> Termination:
        """The reason named by an event's ``status``.

        :raises ValueError: for a status no trigger sends.
        """
        return cls(status)

    @classmethod
    def of_verdict(cls, result: Verdict) -> Termination:
        """The reason a terminal verdict gives (``DONE`` -> success...)."""
        return cls(result.event_status)


@dataclass(frozen=True)
class RunIdentity:
    """Who runs: one task instance and its try. Run keys, claims, manifests and query tags are all built from it.

    :param dag_id: the DAG.
    :param task_id: the task.
    :param run_id: the DAG run.
    :param map_index: the map index (-1 when the task is not mapped).
    :param try_number: the try (it marks what this try submitted, never what the key is).
    """

    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int = 1

    @classmethod
    def from_ti(cls, ti: Any) -> RunIdentity:
        """The identity of a task instance (``context["ti"]``)."""
        map_index = getattr(ti, "map_index", None)
        return cls(str(ti.dag_id), str(ti.task_id), str(ti.run_id), -1 if map_index is None else int(map_index),
                   int(getattr(ti, "try_number", None) or 1))

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> RunIdentity:
        """The identity of the task instance a context belongs to."""
        return cls.from_ti(context["ti"])

    def run_key(self, *parts: object, sep: str, length: int) -> str:
        """THE run key: dag_id, task_id, run_id and map_index, then ``parts`` (the input's fingerprint, the
        endpoint or model), hashed by :func:`~airflow_provider_synth.batch.keys.run_key`. The try is not part
        of it: every try of a task instance finds the same run.

        :param parts: what else identifies the run (pinned per backend, in its order).
        :param sep: the separator, pinned per backend.
        :param length: hex digits kept, pinned per backend.
        """
        return run_key(self.dag_id, self.task_id, self.run_id, self.map_index, *parts, sep=sep, length=length)

    @property
    def dag_run_key(self) -> str:
        """The DAG run's key (claims of an output folder group under it)."""
        return dag_run_key(self.dag_id, self.run_id)

    def manifest_fields(self) -> dict[str, Any]:
        """The manifest's (and XCom's) keys naming who wrote it."""
        return {"try_number": self.try_number, "dag_id": self.dag_id, "task_id": self.task_id,
                "run_id": self.run_id, "map_index": self.map_index}


class ShardedWork:
    """The work folder of a run whose plan keeps a ``work_dir`` and shards (OpenAI/Azure, Anthropic): one layout,
    which the CLI reads too: ``<work_dir>/shards/shard-00000-r0.jsonl`` is shard 0's input of round 0.

    The run sets ``plan`` (with ``work_dir``) and ``_path`` (a stored path string -> a path object that keeps
    its connection, :func:`~airflow_provider_synth.batch.paths.as_path`).
    """

    def _work(self, *names: str) -> Any:
        """A path in the run's work folder (the folder itself without ``names``)."""
        from airflow_provider_synth.batch.paths import join_path

        path = self._path(self.plan.work_dir)  # type: ignore[attr-defined]  # the run's (typed there)
        for name in names:
            path = join_path(path, name)
        return path

    def shard_input(self, shard: int, rnd: int) -> Any:
        """The requests of ``shard`` in round ``rnd``."""
        return self._work("shards", f"shard-{shard:05d}-r{rnd}.jsonl")


class SynthRun(abc.ABC):
    """What every backend's run provides (see the module's table); the wait loop over THE verdict is here.

    A subclass sets :attr:`backend` (a class attribute, or a property) and, when it waits for something other
    than batches, :attr:`waited`.
    """

    #: what the run waits for: its status table and its name in messages
    waited: ClassVar[Waited] = BATCHES

    @property
    @abc.abstractmethod
    def backend(self) -> str:
        """The manifest's ``backend`` (``openai``, ``azure_openai``, ``cortex``, ``vllm``...)."""

    @property
    @abc.abstractmethod
    def output_dir(self) -> Any:
        """The output folder, as the run writes it (a path object keeps its connection)."""

    @property
    def started_at(self) -> float | None:
        """When the run first submitted (epoch seconds, by the worker's clock; ``None``: not yet): its
        deadline is counted from here, so a retry never extends it."""
        return None

    @abc.abstractmethod
    def attach(self) -> None:
        """Find everything this run submitted already (any try, any worker) and take up its state."""

    @abc.abstractmethod
    def submit(self) -> list[str]:
        """Submit what the run still needs (round 0, or the round :meth:`next_round` planned) and has not
        submitted yet; return the new ids. Never submits anything twice."""

    @abc.abstractmethod
    def states(self) -> dict[str, str | None]:
        """Every id waited for -> its last known status (``None``: never polled)."""

    @abc.abstractmethod
    def poll(self) -> list[tuple[str, BaseException]]:
        """Retrieve every unfinished id through the hook; return ``(id, error)`` per failed retrieve (the id
        keeps its last state) instead of raising."""

    @abc.abstractmethod
    def is_transient(self, error: BaseException) -> bool:
        """Whether a polling error may go away by itself: the hook's own classification."""

    @abc.abstractmethod
    def cancel(self) -> list[str]:
        """Cancel what is still running (best effort: a failing cancel is logged); return the ids cancelled."""

    def next_round(self) -> list[Any]:
        """Plan the next round: what :meth:`submit` sends next, only requests a retry can fix (empty: nothing
        left to submit). A backend without rounds keeps this default."""
        return []

    @abc.abstractmethod
    def collect(self) -> Accounting:
        """Merge every answer into the output folder (``results.jsonl``, ``failures.jsonl``) and return the
        accounting (checked: every request exactly once)."""

    @abc.abstractmethod
    def manifest(self, acct: Accounting | None, status: str, **fields: Any) -> dict[str, Any]:
        """The run's manifest (:func:`~airflow_provider_synth.batch.manifest.build_manifest`): the
        accounting (``None`` before collection), ``status`` (``submitted``, ``completed``), the backend's ids,
        usage and ``cost_usd``, and ``fields`` (:meth:`RunIdentity.manifest_fields`)."""

    def failure_hints(self, acct: Accounting) -> list[str]:
        """What the backend adds to THE failure message: what a retry can and cannot change."""
        return []

    def systematic_message(self) -> str | None:
        """Why the task fails even within ``max_failed_ratio``: a kind of unusable answer found systematic and
        not retried (:func:`~airflow_provider_synth.batch.checks.systematic_kinds`), with examples. Default:
        none (a backend without retry rounds retries nothing anyway)."""
        return None

    def close(self) -> None:  # noqa: B027  (a hook with a default, not abstract)
        """Release the run's connections (the lifecycle calls it when a step ends; a later call reopens)."""
        return None

    def settle(self, ok: bool) -> None:  # noqa: B027  (a hook with a default, not abstract)
        """After the finish: release what the run held (``ok``: within ``max_failed_ratio``). Default: nothing."""
        return None

    # -- written once ------------------------------------------------------------------------------------------

    @property
    def running(self) -> list[str]:
        """The ids not finished yet."""
        phases = self.waited.phases
        return [i for i, s in self.states().items() if not phases.get(s, False)]

    def describe(self, error: BaseException) -> str:
        """A polling error for messages and logs, with anything secret masked."""
        from airflow.providers.common.compat.sdk import redact

        return str(redact(repr(error)))

    def verdict(self, errors: PollErrors = (), *, consecutive_errors: int = 0,
                max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
                end_time: float | None = None, now: float | None = None) -> Verdict:
        """THE verdict on the run's states after a poll.

        :param errors: the poll's errors (:meth:`poll`).
        :param consecutive_errors: polls in a row that failed, this one included.
        :param max_consecutive_errors: transient failures in a row tolerated.
        :param end_time: the run's deadline, epoch seconds (``None``: none).
        :param now: the current epoch time (default: ``time.time()``).
        """
        worst = next(((i, e) for i, e in errors if not self.is_transient(e)), errors[0] if errors else None)
        return status_verdict(self.states(), kind=self.waited,
                              error=PollError.of(self.is_transient(e) for _, e in errors),
                              last_error=(worst[0], self.describe(worst[1])) if worst else None,
                              consecutive_errors=consecutive_errors, max_consecutive_errors=max_consecutive_errors,
                              end_time=end_time, now=now)

    def wait(self, poll_interval: float, end_time: float | None, *,
             max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
             sleep: Callable[[float], Any] | None = None, clock: Callable[[], float] | None = None,
             progress: Callable[[dict[str, int]], Any] | None = None) -> Verdict:
        """Wait in this process (the operator's worker-side wait, the CLI) until everything is finished or the
        deadline passed: the trigger's rules, with blocking calls. Judges the states known now first, then
        sleeps and polls.

        :param poll_interval: seconds between polls.
        :param end_time: the deadline, epoch seconds; ``None``: none.
        :param max_consecutive_errors: transient polling errors in a row tolerated.
        :param sleep: ``time.sleep`` (tests pass a fake clock's).
        :param clock: ``time.time`` (tests pass a fake clock's).
        :param progress: called with the count per status whenever it changes.
        :return: a ``DONE`` or ``TIMEOUT`` verdict.
        :raises BatchFailedError: on an unknown status, or too many transient polling errors in a row; a
            polling error that is not transient propagates as raised (its type says what is wrong).
        """
        from airflow_provider_synth.exceptions import BatchFailedError

        sleep = sleep or time.sleep
        clock = clock or time.time
        errors: list[tuple[str, BaseException]] = []
        consecutive, last = 0, None
        while True:
            result = self.verdict(errors, consecutive_errors=consecutive,
                                  max_consecutive_errors=max_consecutive_errors, end_time=end_time, now=clock())
            fatal = [e for _, e in errors if not self.is_transient(e)]
            if result.next is Next.FAILED and fatal:
                raise fatal[0]
            if result.next in (Next.FAILED, Next.UNKNOWN):
                raise BatchFailedError(f"waiting for {self.waited.plural} failed: {result.message}")
            if result.over:
                return result
            counts = status_counts(self.states())
            if progress is not None and counts != last:
                last = counts
                progress(counts)
            sleep(poll_interval if end_time is None else min(poll_interval, max(end_time - clock(), 0.0)))
            errors = self.poll()
            consecutive = consecutive + 1 if errors else 0
            for item, error in errors:
                log.warning("polling %s %s failed: %s", self.waited.noun, item, self.describe(error))


def status_counts(states: Mapping[str, str | None]) -> dict[str, int]:
    """How many ids are in each status (for progress lines)."""
    counts: dict[str, int] = {}
    for status in states.values():
        counts[str(status)] = counts.get(str(status), 0) + 1
    return counts


# -- the finish -----------------------------------------------------------------------------------------------


def failed_ratio(acct: Accounting) -> float:
    """THE failed ratio: failed and missing requests over all of them (0 for an empty run)."""
    return (acct.failed + acct.missing) / acct.total if acct.total else 0.0


def failure_message(acct: Accounting, max_failed_ratio: float, output_dir: Any, hints: Sequence[str] = ()) -> str:
    """THE message of a run over ``max_failed_ratio``: how many failed, the commonest errors, where the
    evidence is, and what the backend says a retry can do (``hints``)."""
    paths = output_paths(output_dir)
    failed = acct.failed + acct.missing
    codes = ", ".join(f"{c}: {n}" for c, n in acct.error_codes.most_common(5)) or "none recorded"
    head = (f"{failed} of {acct.total} requests failed ({acct.failed} failed, {acct.missing} missing; "
            f"{failed_ratio(acct):.1%} > max_failed_ratio {max_failed_ratio:.1%}); errors {codes}. Failed "
            f"requests and their errors are in {paths['failures_path']}, results of the rest in "
            f"{paths['results_path']}.")
    return " ".join([head, *hints])


@dataclass(frozen=True)
class Finished:
    """A finished run: its manifest (written), and whether it is within ``max_failed_ratio``.

    :param manifest: the manifest written to ``manifest.json`` (the task's XCom).
    :param ok: within ``max_failed_ratio``.
    :param message: THE failure message when not ``ok`` (empty otherwise).
    """

    manifest: dict[str, Any]
    ok: bool
    message: str = ""

    def raise_for_failures(self) -> dict[str, Any]:
        """Return the manifest, or raise THE exception of a run over ``max_failed_ratio``.

        :raises BatchFailedError: with :attr:`message`.
        """
        from airflow_provider_synth.exceptions import BatchFailedError

        if not self.ok:
            raise BatchFailedError(self.message)
        return self.manifest


def finish(acct: Accounting, manifest: dict[str, Any], output_dir: Any, *, max_failed_ratio: float,
           hints: Sequence[str] = ()) -> Finished:
    """THE finish of every run: check the accounting, write ``manifest.json`` into ``output_dir``, log the outcome and judge it against ``max_failed_ratio``.

    :param acct: the run's accounting (:meth:`SynthRun.collect`).
    :param manifest: the manifest (:func:`~airflow_provider_synth.batch.manifest.build_manifest`).
    :param output_dir: the output folder, as the run writes it (a path object keeps its connection).
    :param max_failed_ratio: the largest share of failed or missing requests accepted.
    :param hints: what the backend adds to the failure message (what a retry can and cannot change).
    """
    acct.check()
    write_manifest(output_dir, manifest)
    # the usage cost_usd prices: every billed answer (results, and the answers the checks refused)
    billed = manifest.get("billed_usage") or Usage().add(acct.usage).add(acct.unusable_usage).as_dict()
    log.info("%s: %d succeeded, %d failed, %d missing of %d; billed %s token(s) for %s answer(s) (results and "
             "refused ones: %s); cost %s", manifest.get("backend"), acct.succeeded, acct.failed, acct.missing,
             acct.total, f"{billed['total_tokens']:,}", f"{billed['requests']:,}", billed,
             format_usd(manifest.get("cost_usd")))
    if failed_ratio(acct) <= max_failed_ratio:
        return Finished(manifest, True)
    return Finished(manifest, False, failure_message(acct, max_failed_ratio, output_dir, hints))


__all__ = [
    "Finished",
    "RunIdentity",
    "SynthRun",
    "Termination",
    "failed_ratio",
    "failure_message",
    "finish",
    "status_counts",
]
