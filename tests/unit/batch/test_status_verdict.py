"""THE verdict: every status x poll error x deadline, for batches and Cortex statements.

The expectations are written out here, independently of the tables in ``batch/status.py``: a status that
moves from one phase to another there, or a rule that changes order, fails a row below.
"""

from __future__ import annotations

import itertools

import pytest

from airflow_provider_synth.batch.status import (
    BATCH_PHASES,
    BATCHES,
    STATEMENT_PHASES,
    STATEMENTS,
    Next,
    PollError,
    Verdict,
    Waited,
    verdict,
)

RUN, FIN, UNK = "running", "finished", "unknown"

#: every status a waiter can meet, as the Batch API and the SQL API document them, and its phase
BATCH_STATUSES = {
    None: RUN, "validating": RUN, "in_progress": RUN, "finalizing": RUN, "cancelling": RUN,
    "completed": FIN, "expired": FIN, "failed": FIN, "cancelled": FIN,
    "paused_by_aliens": UNK, "": UNK, "COMPLETED": UNK,
}
STATEMENT_STATUSES = {None: RUN, "running": RUN, "success": FIN, "error": FIN, "queued": UNK, "completed": UNK}

#: the poll's error: (PollError, consecutive errors) with max_consecutive_errors=3
ERRORS = {
    "none": (PollError.NONE, 0),
    "transient, 1st": (PollError.TRANSIENT, 1),
    "transient, at the limit": (PollError.TRANSIENT, 3),
    "transient, over the limit": (PollError.TRANSIENT, 4),
    "fatal": (PollError.FATAL, 1),
}
#: end_time relative to now=1000 (None: no deadline)
DEADLINES = {"no deadline": None, "before the deadline": 1001.0, "at the deadline": 1000.0, "after": 999.0}

F, U, D, T, W = Next.FAILED, Next.UNKNOWN, Next.DONE, Next.TIMEOUT, Next.WAIT
#: phase -> error -> the outcome for (no deadline, before, at, after)
EXPECTED: dict[str, dict[str, tuple[Next, Next, Next, Next]]] = {
    RUN: {
        "none": (W, W, T, T),
        "transient, 1st": (W, W, T, T),
        "transient, at the limit": (W, W, T, T),
        "transient, over the limit": (F, F, F, F),
        "fatal": (F, F, F, F),
    },
    FIN: {
        "none": (D, D, D, D),
        "transient, 1st": (D, D, D, D),
        "transient, at the limit": (D, D, D, D),
        "transient, over the limit": (F, F, F, F),
        "fatal": (F, F, F, F),
    },
    UNK: {
        "none": (U, U, U, U),
        "transient, 1st": (U, U, U, U),
        "transient, at the limit": (U, U, U, U),
        "transient, over the limit": (F, F, F, F),
        "fatal": (F, F, F, F),
    },
}


def _cases() -> list[tuple[Waited, str | None, str, str]]:
    cases = [(BATCHES, s, e, d) for s, e, d in itertools.product(BATCH_STATUSES, ERRORS, DEADLINES)]
    cases += [(STATEMENTS, s, e, d) for s, e, d in itertools.product(STATEMENT_STATUSES, ERRORS, DEADLINES)]
    return cases


@pytest.mark.parametrize(("kind", "status", "error", "deadline"), _cases(),
                         ids=lambda v: v.noun if isinstance(v, Waited) else repr(v))
def test_every_status_error_and_deadline(kind: Waited, status: str | None, error: str, deadline: str) -> None:
    phase = (BATCH_STATUSES if kind is BATCHES else STATEMENT_STATUSES)[status]
    expected = EXPECTED[phase][error][list(DEADLINES).index(deadline)]
    poll_error, consecutive = ERRORS[error]
    result = verdict({"id-1": status}, kind=kind, error=poll_error, consecutive_errors=consecutive,
                     max_consecutive_errors=3, end_time=DEADLINES[deadline], now=1000.0,
                     last_error=("id-1", "APIError('boom')") if poll_error is not PollError.NONE else None)
    assert result.next is expected
    assert result.over is (expected is not Next.WAIT)
    assert result.event_status == {D: "success", F: "error", U: "error", T: "timeout", W: None}[expected]
    if expected in (F, U, T):
        assert result.message
    if expected is U:
        assert result.ids == ("id-1",) and f"unknown status {status!r}" in result.message
    if expected in (T, W):
        assert result.ids == ("id-1",)


def test_the_tables_cover_every_documented_status() -> None:
    assert {s for s, p in BATCH_STATUSES.items() if p != UNK} == set(BATCH_PHASES)
    assert {s for s, p in STATEMENT_STATUSES.items() if p != UNK} == set(STATEMENT_PHASES)
    assert {s for s, p in BATCH_STATUSES.items() if p == FIN} == {s for s, f in BATCH_PHASES.items() if f}


@pytest.mark.parametrize(
    ("statuses", "end_time", "expected", "ids"),
    [
        ({"a": "completed", "b": "failed"}, None, D, ()),
        ({"a": "completed", "b": "in_progress"}, None, W, ("b",)),
        ({"a": "completed", "b": None}, None, W, ("b",)),  # b never polled: still waited for
        ({"a": "completed", "b": "in_progress", "c": "validating"}, 999.0, T, ("b", "c")),
        ({"a": "completed", "b": "expired"}, 999.0, D, ()),  # finished at the deadline: done, not timed out
        ({"a": "weird", "b": "in_progress", "c": "odd"}, 999.0, U, ("a", "c")),  # unknown beats the deadline
        ({"a": "weird", "b": "completed"}, None, U, ("a",)),
    ],
)
def test_several_batches(statuses, end_time, expected, ids) -> None:
    result = verdict(statuses, end_time=end_time, now=1000.0)
    assert (result.next, result.ids) == (expected, ids)


def test_messages_name_what_ended_the_wait() -> None:
    fatal = verdict({"b1": "in_progress"}, error=PollError.FATAL, consecutive_errors=1,
                    last_error=("b1", "NotFoundError('no such batch')"))
    assert fatal.message == "Polling batch b1 failed: NotFoundError('no such batch')"
    many = verdict({"q1": "running"}, kind=STATEMENTS, error=PollError.TRANSIENT, consecutive_errors=6,
                   max_consecutive_errors=5, last_error=("q1", "TimeoutError: slow"))
    assert many.message == ("Polling failed 6 times in a row (max_consecutive_errors=5); last, statement q1: "
                            "TimeoutError: slow")
    late = verdict({"q1": "success", "q2": "running"}, kind=STATEMENTS, end_time=10.0, now=11.0)
    assert late.message == "Deadline (end_time=10) passed with 1 of 2 statements still running: q2."
    assert verdict({"b1": "completed"}) == Verdict(Next.DONE)  # the caller words its own success


@pytest.mark.parametrize(
    ("flags", "expected"),
    [((), PollError.NONE), ((True,), PollError.TRANSIENT), ((True, True), PollError.TRANSIENT),
     ((False,), PollError.FATAL), ((True, False), PollError.FATAL)],
)
def test_the_worst_error_of_a_poll(flags, expected) -> None:
    assert PollError.of(iter(flags)) is expected


def test_the_deadline_defaults_to_the_clock(monkeypatch) -> None:
    import airflow_provider_synth.batch.status as status

    monkeypatch.setattr(status.time, "time", lambda: 500.0)
    assert verdict({"b": "in_progress"}, end_time=500.0).next is Next.TIMEOUT
    assert verdict({"b": "in_progress"}, end_time=500.5).next is Next.WAIT
