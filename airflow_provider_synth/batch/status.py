"""Batch and statement statuses, and THE verdict: what a waiter does after each poll.

Every waiter asks the same question after each poll: the OpenAI and Cortex triggers, the operators' waits in
the worker, the sensor's poke and the CLI's ``download --wait``. :func:`verdict` answers it, once, from three
tables: what each status means (:data:`BATCH_PHASES`, :data:`STATEMENT_PHASES`), what a polling error means
(:class:`PollError`), and the order in which the rules apply (:data:`RULES`).

Light enough for a trigger to import inside the triggerer's event loop: no import beyond the standard library.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai.types import Batch

#: Statuses after which a batch never changes again.
TERMINAL_STATUSES = frozenset({"completed", "expired", "failed", "cancelled"})
#: Statuses of a batch still running; ``cancelling`` is one of them (it still finalizes partial output).
IN_PROGRESS_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})

#: Every Batch API status -> ``True`` when the batch is finished for good. ``None``: not polled yet.
BATCH_PHASES: Mapping[str | None, bool] = {
    None: False,
    **dict.fromkeys(IN_PROGRESS_STATUSES, False),
    **dict.fromkeys(TERMINAL_STATUSES, True),
}
#: Every statement state (:class:`~airflow_provider_synth.hooks.cortex.StatementStatus`) -> finished.
STATEMENT_PHASES: Mapping[str | None, bool] = {None: False, "running": False, "success": True, "error": True}
#: Every Amazon Bedrock batch inference job status -> finished. ``Stopping`` still runs (it may still write the
#: output of the records it processed); ``PartiallyCompleted`` finished with some records failed: the run reads
#: the output back and judges it like any other batch's.
JOB_PHASES: Mapping[str | None, bool] = {
    None: False,
    **dict.fromkeys(("Submitted", "Validating", "Scheduled", "InProgress", "Stopping"), False),
    **dict.fromkeys(("Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"), True),
}
#: Transient polling errors in a row a waiter tolerates by default.
DEFAULT_MAX_CONSECUTIVE_ERRORS = 5


@dataclass(frozen=True)
class Waited:
    """What a waiter waits for: its name in messages and its status table.

    :param noun: one of them (``batch``).
    :param plural: several (``batches``).
    :param phases: status -> finished for good.
    """

    noun: str
    plural: str
    phases: Mapping[str | None, bool]


BATCHES = Waited("batch", "batches", BATCH_PHASES)
STATEMENTS = Waited("statement", "statements", STATEMENT_PHASES)
JOBS = Waited("job", "jobs", JOB_PHASES)


class Next(enum.Enum):
    """What a waiter does next."""

    WAIT = "wait"  #: poll again after ``poll_interval``
    DONE = "done"  #: every batch (statement) finished; the caller judges the outcome
    FAILED = "failed"  #: polling failed: an error that will not go away, or too many transient ones in a row
    TIMEOUT = "timeout"  #: the deadline passed with some still running (the caller cancels them)
    UNKNOWN = "unknown"  #: a status no table knows: stop rather than wait forever on it


class PollError(enum.Enum):
    """What went wrong while polling, worst first."""

    NONE = "none"
    TRANSIENT = "transient"  #: a network error, a timeout, 429 or 5xx: may go away by itself
    FATAL = "fatal"  #: anything else (401, 404, a bad connection...)

    @classmethod
    def of(cls, transient: Iterable[bool]) -> PollError:
        """The worst of one poll's errors, given whether each one is transient.

        :param transient: one flag per error of the poll (empty: the poll succeeded).
        """
        flags = list(transient)
        if not flags:
            return cls.NONE
        return cls.TRANSIENT if all(flags) else cls.FATAL


#: The event status a trigger sends for each terminal verdict.
EVENT_STATUS: Mapping[Next, str] = {
    Next.DONE: "success", Next.FAILED: "error", Next.UNKNOWN: "error", Next.TIMEOUT: "timeout",
}


@dataclass(frozen=True)
class Verdict:
    """:func:`verdict`'s answer.

    :param next: what to do.
    :param ids: the ids it concerns: those with an unknown status (``UNKNOWN``), those still running
        (``TIMEOUT``, ``WAIT``), none otherwise.
    :param message: why the wait is over, for ``FAILED``, ``UNKNOWN`` and ``TIMEOUT`` (the caller words
        ``DONE`` itself: only it knows what finished means for its backend); empty otherwise.
    """

    next: Next
    ids: tuple[str, ...] = ()
    message: str = ""

    @property
    def over(self) -> bool:
        """The wait is over (anything but ``WAIT``)."""
        return self.next is not Next.WAIT

    @property
    def event_status(self) -> str | None:
        """The trigger event's ``status`` for this verdict (``success``, ``error``, ``timeout``); ``None``
        while waiting."""
        return EVENT_STATUS.get(self.next)


@dataclass(frozen=True)
class _Poll:
    statuses: Mapping[str, str | None]
    kind: Waited
    error: PollError
    consecutive_errors: int
    max_consecutive_errors: int
    end_time: float | None
    deadline_passed: bool
    last_error: tuple[str, str] | None

    def unknown(self) -> tuple[str, ...]:
        return tuple(i for i, s in self.statuses.items() if s not in self.kind.phases)

    def running(self) -> tuple[str, ...]:
        return tuple(i for i, s in self.statuses.items() if not self.kind.phases.get(s, False))

    def message(self, outcome: Next, ids: tuple[str, ...]) -> str:
        k = self.kind
        where, text = self.last_error or ("?", "unknown error")
        if outcome is Next.FAILED and self.error is PollError.FATAL:
            return f"Polling {k.noun} {where} failed: {text}"
        if outcome is Next.FAILED:
            return (f"Polling failed {self.consecutive_errors} times in a row (max_consecutive_errors="
                    f"{self.max_consecutive_errors}); last, {k.noun} {where}: {text}")
        if outcome is Next.UNKNOWN:
            return "; ".join(f"{k.noun.capitalize()} {i} has an unknown status {self.statuses[i]!r}" for i in ids) + "."
        if outcome is Next.TIMEOUT:
            return (f"Deadline (end_time={self.end_time:.0f}) passed with {len(ids)} of {len(self.statuses)} "
                    f"{k.plural} still running: {', '.join(ids)}.")
        return ""


Rule = tuple[Next, Callable[[_Poll], Sequence[str] | bool]]

#: The rules, in order; the first that holds decides. A rule returns ``True`` or the non-empty ids it
#: concerns when it holds. Errors come first (a status read before a fatal error is not to be trusted
#: further), then unknown statuses, then "all finished" (a batch that finished at the deadline has finished),
#: then the deadline.
RULES: tuple[Rule, ...] = (
    (Next.FAILED, lambda p: p.error is PollError.FATAL),
    (Next.FAILED, lambda p: p.error is PollError.TRANSIENT and p.consecutive_errors > p.max_consecutive_errors),
    (Next.UNKNOWN, _Poll.unknown),
    (Next.DONE, lambda p: bool(p.statuses) and not p.running()),
    (Next.TIMEOUT, lambda p: p.running() if p.deadline_passed else False),
)


def verdict(
    statuses: Mapping[str, str | None],
    *,
    kind: Waited = BATCHES,
    error: PollError = PollError.NONE,
    last_error: tuple[str, str] | None = None,
    consecutive_errors: int = 0,
    max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
    end_time: float | None = None,
    now: float | None = None,
) -> Verdict:
    """Decide, after one poll, whether to keep waiting and, if not, why the wait is over.

    :param statuses: every id waited for -> its last known status (``None``: never polled successfully).
    :param kind: what is waited for: :data:`BATCHES` (default) or :data:`STATEMENTS`.
    :param error: the worst error of this poll (:meth:`PollError.of`).
    :param last_error: ``(id, text)`` of that error, for the message; the text must hold no secret.
    :param consecutive_errors: polls in a row that failed, this one included.
    :param max_consecutive_errors: transient failures in a row tolerated; one more fails the wait.
    :param end_time: the absolute deadline in epoch seconds; ``None``: none.
    :param now: the current epoch time (default: ``time.time()``).
    """
    if end_time is not None and now is None:
        now = time.time()
    passed = end_time is not None and now is not None and now >= end_time
    poll = _Poll(statuses, kind, error, consecutive_errors, max_consecutive_errors, end_time, passed, last_error)
    for outcome, rule in RULES:
        held = rule(poll)
        if held:
            ids = tuple(held) if not isinstance(held, bool) else ()
            return Verdict(outcome, ids, poll.message(outcome, ids))
    return Verdict(Next.WAIT, poll.running())



# -- a batch's state, as triggers, sensors, the CLI and XCom carry it ------------------------------------------


def batch_summary(batch: Batch) -> dict[str, Any]:
    """Reduce a ``Batch`` to the JSON-primitive state that triggers, sensors and XCom carry.

    ``output_file_id`` is ``None`` for a batch whose every request failed: callers must read ``error_file_id``.

    :param batch: the SDK's ``Batch``.
    :return: ``{"status", "request_counts": {"total", "completed", "failed"}, "output_file_id",
        "error_file_id", "errors", "usage", "model"}`` where ``errors`` lists the batch-level errors (e.g.
        validation) as strings, and ``usage`` is the service's own token count for the batch (``None`` where it
        reports none).
    """
    return batch_state(batch.model_dump(mode="json"))


def _service_usage(usage: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The Batch object's ``usage`` (input/output tokens and their details) in :class:`Usage`'s names."""
    if not usage:
        return None
    return {"prompt_tokens": int(usage.get("input_tokens") or 0),
            "cached_tokens": int((usage.get("input_tokens_details") or {}).get("cached_tokens") or 0),
            "completion_tokens": int(usage.get("output_tokens") or 0),
            "reasoning_tokens": int((usage.get("output_tokens_details") or {}).get("reasoning_tokens") or 0),
            "total_tokens": int(usage.get("total_tokens") or 0)}


def batch_state(data: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`batch_summary` of a batch's JSON as the API returns it, without building the SDK's ``Batch``.

    :param data: the decoded body of ``GET /batches/{batch_id}``.
    """
    counts = data.get("request_counts") or {}
    errors = [
        f"{e.get('code') or 'error'}: {e.get('message') or ''}"
        + (f" (line {e['line']})" if e.get("line") is not None else "")
        for e in ((data.get("errors") or {}).get("data") or [])
    ]
    return {
        "status": data["status"],
        "request_counts": {
            "total": counts.get("total", 0),
            "completed": counts.get("completed", 0),
            "failed": counts.get("failed", 0),
        },
        "output_file_id": data.get("output_file_id"),
        "error_file_id": data.get("error_file_id"),
        "errors": errors[:20],
        "usage": _service_usage(data.get("usage")),
        "model": data.get("model"),
    }


__all__ = [
    "BATCHES",
    "BATCH_PHASES",
    "DEFAULT_MAX_CONSECUTIVE_ERRORS",
    "EVENT_STATUS",
    "IN_PROGRESS_STATUSES",
    "JOBS",
    "JOB_PHASES",
    "RULES",
    "STATEMENTS",
    "STATEMENT_PHASES",
    "TERMINAL_STATUSES",
    "Next",
    "PollError",
    "Verdict",
    "Waited",
    "batch_state",
    "batch_summary",
    "verdict",
]
