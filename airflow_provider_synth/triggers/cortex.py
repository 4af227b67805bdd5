"""Deferrable trigger that waits for Cortex batch statements, polling the SQL API without blocking the loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from airflow.triggers.base import TriggerEvent

from airflow_provider_synth.batch.status import STATEMENTS
from airflow_provider_synth.triggers.base import PollingTrigger, trigger_event

if TYPE_CHECKING:
    from airflow_provider_synth.hooks.cortex import CortexAsyncHook, StatementStatus

# The triggerer imports a trigger's class path inside its event loop: the hook (the snowflake provider, the
# batch core) is imported in a thread by run() and on_kill() instead.
_HOOKS_MODULE = "airflow_provider_synth.hooks.cortex"


class CortexStatementTrigger(PollingTrigger):
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

    waited = STATEMENTS
    hooks_module = _HOOKS_MODULE
    #: the key of the event's per-statement states
    event_key = "statements"
    target_fields, ids_field = ("snowflake_conn_id", "query_ids"), "query_ids"
    cancel_timeout = 30.0

    def __init__(
        self,
        snowflake_conn_id: str,
        query_ids: Sequence[str],
        poll_interval: float = 10.0,
        end_time: float | None = None,
        max_consecutive_errors: int = 5,
        cancel_on_kill: bool = True,
    ) -> None:
        self.snowflake_conn_id = snowflake_conn_id
        self.query_ids = list(query_ids)
        super().__init__(poll_interval=poll_interval, end_time=end_time,
                         max_consecutive_errors=max_consecutive_errors, cancel_on_kill=cancel_on_kill)

    def _hook(self) -> CortexAsyncHook:
        from airflow_provider_synth.hooks.cortex import CortexAsyncHook

        return CortexAsyncHook(self.snowflake_conn_id)

    async def _fetch(self, hook: CortexAsyncHook, item_id: str) -> StatementStatus:
        return await hook.poll_statement(item_id)

    def _status(self, state: StatementStatus) -> str | None:
        return state.state

    def _progress(self, item_id: str, state: StatementStatus) -> str:
        return f"Statement {item_id}: {state.state} ({state.message})"

    def _event(self, status: str, message: str) -> TriggerEvent:
        not_polled = {"state": "running", "message": "not polled yet"}
        statements = {
            q: state.as_dict() if (state := self._states.get(q)) else {"query_id": q, **not_polled}
            for q in self.query_ids
        }
        return trigger_event({"status": status, "message": message, "statements": statements})

    def _done_message(self) -> str:
        failed = [q for q in self.query_ids if self._states[q].state == "error"]
        message = f"All {len(self.query_ids)} statements finished"
        return message + (f"; {len(failed)} failed: {', '.join(failed)}." if failed else ", all succeeded.")

    async def _cancel(self, hook: CortexAsyncHook, item_id: str) -> str:
        result = await hook.acancel_statement(item_id)
        return f"Cancel of statement {item_id}: {result.message}"
