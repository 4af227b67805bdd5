"""Deferrable trigger that waits for Cortex batch statements, polling the SQL API without blocking the loop."""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_synth.batch.status import STATEMENTS, PollError, verdict

if TYPE_CHECKING:
    from airflow_provider_synth.batch.cortex import StatementStatus
    from airflow_provider_synth.hooks.cortex import CortexAsyncHook

# The triggerer imports a trigger's class path inside its event loop: the hook (the snowflake provider, the
# batch core) is imported in a thread by run() and on_kill() instead.
_HOOKS_MODULE = "airflow_provider_synth.hooks.cortex"


async def _import_hooks() -> None:
    if _HOOKS_MODULE not in sys.modules:
        await asyncio.to_thread(importlib.import_module, _HOOKS_MODULE)

#: Seconds ``on_kill`` may spend cancelling statements (Airflow bounds it too; stay well inside that).
_CANCEL_TIMEOUT_S = 30.0


def _now() -> float:
    return time.time()


class CortexStatementTrigger(BaseTrigger):
    """Wait until every statement of a Cortex batch has finished; yield ONE event with each one's final state.

    Polls ``GET /api/v2/statements/{query_id}`` for all statements concurrently through
    :class:`~airflow_provider_synth.hooks.cortex.CortexAsyncHook` (async connection lookup, ``aiohttp``).

    The event is ``{"status": "success" | "error" | "timeout", "message": str, "statements": {query_id:
    {"query_id", "state", "message"}}}``. ``success`` means every statement finished, some possibly failed
    (their ``state`` is ``error``): the operator reads back what was answered and accounts for the rest.
    ``error`` reports a polling failure; ``timeout`` that ``end_time`` passed (the operator cancels).

    :param snowflake_conn_id: the Snowflake connection the statements ran under.
    :param query_ids: the statements' query ids (SQL API statement handles).
    :param poll_interval: seconds between polls.
    :param end_time: absolute deadline in epoch seconds, fixed at the first submission, so a triggerer restart
        or a task retry never extends it; ``None`` waits as long as the statements run.
    :param max_consecutive_errors: transient polling errors in a row tolerated before giving up.
    :param cancel_on_kill: cancel the statements still running when a user kills the task (Airflow 3.3+).
    """

    def __init__(
        self,
        snowflake_conn_id: str,
        query_ids: Sequence[str],
        poll_interval: float = 10.0,
        end_time: float | None = None,
        max_consecutive_errors: int = 5,
        cancel_on_kill: bool = True,
    ) -> None:
        super().__init__()
        self.snowflake_conn_id = snowflake_conn_id
        self.query_ids = list(query_ids)
        self.poll_interval = float(poll_interval)
        self.end_time = float(end_time) if end_time is not None else None
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.cancel_on_kill = bool(cancel_on_kill)
        if not self.query_ids:
            raise ValueError("CortexStatementTrigger needs at least one query id")
        self._states: dict[str, StatementStatus] = {}
        self._consecutive_errors = 0

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and kwargs; the kwargs are a stored schema: add new ones with defaults only."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "snowflake_conn_id": self.snowflake_conn_id,
                "query_ids": list(self.query_ids),
                "poll_interval": self.poll_interval,
                "end_time": self.end_time,
                "max_consecutive_errors": self.max_consecutive_errors,
                "cancel_on_kill": self.cancel_on_kill,
            },
        )

    def _hook(self) -> CortexAsyncHook:
        from airflow_provider_synth.hooks.cortex import CortexAsyncHook

        return CortexAsyncHook(self.snowflake_conn_id)

    def _running(self) -> list[str]:
        return [q for q in self.query_ids if q not in self._states or self._states[q].state == "running"]

    def _event(self, status: str, message: str) -> TriggerEvent:
        from airflow_provider_synth.batch.cortex import StatementStatus

        statements = {
            q: (self._states.get(q) or StatementStatus(q, "running", "not polled yet")).as_dict()
            for q in self.query_ids
        }
        return TriggerEvent({"status": status, "message": message, "statements": statements})

    async def _poll(self, hook: CortexAsyncHook) -> list[tuple[str, BaseException]]:
        pending = self._running()
        results = await asyncio.gather(*(hook.poll_statement(q) for q in pending), return_exceptions=True)
        errors: list[tuple[str, BaseException]] = []
        for query_id, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                errors.append((query_id, result))
                continue
            if result != self._states.get(query_id):
                self.log.info("Statement %s: %s (%s)", query_id, result.state, result.message)
            self._states[query_id] = result
        return errors

    def _verdict(self, errors: list[tuple[str, BaseException]]) -> TriggerEvent | None:
        """The terminal event after one poll, if the wait is over; ``None`` to keep polling."""
        from airflow_provider_synth.hooks.cortex import is_transient

        worst = next(((q, e) for q, e in errors if not is_transient(e)), errors[0] if errors else None)
        result = verdict(
            {q: s.state if (s := self._states.get(q)) else None for q in self.query_ids},
            kind=STATEMENTS,
            error=PollError.of(is_transient(e) for _, e in errors),
            last_error=(worst[0], f"{type(worst[1]).__name__}: {worst[1]}") if worst else None,
            consecutive_errors=self._consecutive_errors,
            max_consecutive_errors=self.max_consecutive_errors,
            end_time=self.end_time,
            now=_now(),
        )
        if result.event_status is None:
            return None
        if result.message:
            return self._event(result.event_status, result.message)
        failed = [q for q in self.query_ids if self._states[q].state == "error"]
        message = f"All {len(self.query_ids)} statements finished"
        message += f"; {len(failed)} failed: {', '.join(failed)}." if failed else ", all succeeded."
        return self._event(result.event_status, message)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until every statement finished, the deadline passes, or polling fails; yield one event."""
        self._consecutive_errors = 0
        await _import_hooks()
        async with self._hook() as hook:
            event = await self._wait(hook)
        # the session is closed before the event leaves: a runner that stops iterating after the first event
        # (dag.test() does) never leaves it to a generator finalizer ("Unclosed connector")
        yield event

    async def _wait(self, hook: CortexAsyncHook) -> TriggerEvent:
        while True:
            errors = await self._poll(hook)
            self._consecutive_errors = self._consecutive_errors + 1 if errors else 0
            for query_id, error in errors:
                self.log.warning("Polling statement %s failed: %s: %s", query_id, type(error).__name__, error)
            event = self._verdict(errors)
            if event is not None:
                return event
            delay = self.poll_interval
            if self.end_time is not None:
                delay = max(0.0, min(delay, self.end_time - _now()))
            await asyncio.sleep(delay)

    async def on_kill(self) -> None:
        """Cancel the statements that may still be running, when a user kills the task (Airflow 3.3+)."""
        if not self.cancel_on_kill:
            return
        running = self._running()
        if not running:
            return
        await _import_hooks()
        async with self._hook() as hook:
            results = await asyncio.wait_for(
                asyncio.gather(*(hook.acancel_statement(q) for q in running), return_exceptions=True),
                timeout=_CANCEL_TIMEOUT_S,
            )
        for query_id, result in zip(running, results, strict=True):
            if isinstance(result, BaseException):
                self.log.warning("Cancelling statement %s failed: %s: %s", query_id, type(result).__name__, result)
            else:
                self.log.info("Cancel of statement %s: %s", query_id, result.message)
