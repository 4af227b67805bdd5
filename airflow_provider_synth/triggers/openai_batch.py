"""Deferrable trigger that waits for a set of OpenAI / Azure OpenAI batches, without blocking the event loop."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import TriggerEvent

from airflow_provider_synth.batch.status import BATCHES
from airflow_provider_synth.triggers.base import PollingTrigger, trigger_event

if TYPE_CHECKING:
    from airflow_provider_synth.hooks.openai import OpenAIBatchAsyncHook

# The triggerer imports a trigger's class path inside its event loop. This module therefore imports neither
# ``openai`` nor the hooks (about a second of import, more on a busy machine, for every trigger of the
# process to wait out): :meth:`PollingTrigger.run` imports them in a thread.
_HOOKS_MODULE = "airflow_provider_synth.hooks.openai"


class OpenAIBatchTrigger(PollingTrigger):
    """Wait until every batch reaches a terminal status; yield ONE event with each batch's final state.

    Polls all its batches concurrently through :class:`OpenAIBatchAsyncHook` (async connection lookup, async
    client), so thousands of waiting batches share one triggerer loop. ``cancelling`` counts as in progress.

    The event is ``{"status": "success" | "error" | "timeout", "message": str, "batches": {batch_id: {"status",
    "request_counts": {"total", "completed", "failed"}, "output_file_id", "error_file_id", "errors"}}}``.
    ``success`` means every batch is terminal (``completed``, ``expired``, ``failed`` or ``cancelled``): the
    operator decides what is acceptable. A ``completed`` batch with ``output_file_id`` null failed every request.
    ``error`` reports an unknown status, a non-transient API error, or too many transient ones in a row;
    ``timeout`` reports that ``end_time`` passed (the operator cancels the batches).

    :param conn_id: the connection the batches were created with.
    :param batch_ids: the batches to wait for.
    :param poll_interval: seconds between polls.
    :param end_time: absolute deadline in epoch seconds, fixed when the batches were first submitted, so a
        triggerer restart or a task retry never extends it; ``None`` waits for as long as the batches run.
    :param max_consecutive_errors: transient polling errors in a row tolerated before giving up.
    :param cancel_on_kill: cancel the batches still running when a user kills the task (Airflow 3.3+).
    """

    waited = BATCHES
    hooks_module = _HOOKS_MODULE
    sdk_module = "openai"
    #: the key of the event's per-batch states
    event_key = "batches"
    target_fields, ids_field = ("conn_id", "batch_ids"), "batch_ids"
    jitter = 0.1
    start_spread = 0.5
    cancel_timeout = 20.0

    def __init__(
        self,
        conn_id: str,
        batch_ids: Sequence[str],
        poll_interval: float = 30.0,
        end_time: float | None = None,
        max_consecutive_errors: int = 5,
        cancel_on_kill: bool = True,
    ) -> None:
        self.conn_id = conn_id
        self.batch_ids = list(batch_ids)
        super().__init__(poll_interval=poll_interval, end_time=end_time,
                         max_consecutive_errors=max_consecutive_errors, cancel_on_kill=cancel_on_kill)

    @classmethod
    def _warm_up(cls) -> None:
        super()._warm_up()  # the SDK and the hooks, then the process's TLS context (about 50 ms of CPU), off the loop
        importlib.import_module("airflow_provider_synth.hooks.openai_pool").shared_ssl_context()

    def _hook(self) -> OpenAIBatchAsyncHook:
        from airflow_provider_synth.hooks.openai import OpenAIBatchAsyncHook

        return OpenAIBatchAsyncHook(self.conn_id)

    async def _fetch(self, hook: OpenAIBatchAsyncHook, item_id: str) -> dict[str, Any]:
        return await hook.aget_batch_state(item_id)

    def _progress(self, item_id: str, state: dict[str, Any]) -> str:
        counts = state["request_counts"]
        return (
            f"batch {item_id}: {state['status']}, {counts['completed']}/{counts['total']} completed, "
            f"{counts['failed']} failed"
        )

    def _event(self, status: str, message: str) -> TriggerEvent:
        batches = {
            batch_id: self._states.get(batch_id)
            or {"status": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "output_file_id": None, "error_file_id": None, "errors": []}
            for batch_id in self.batch_ids
        }
        return trigger_event({"status": status, "message": message, "batches": batches})

    def _done_message(self) -> str:
        by_status: dict[str, int] = {}
        for state in self._states.values():
            by_status[state["status"]] = by_status.get(state["status"], 0) + 1
        parts = [f"{n} {status}" for status, n in sorted(by_status.items())]
        message = f"All {len(self.batch_ids)} batches finished: {', '.join(parts)}."
        no_output = [b for b, s in self._states.items() if s["status"] == "completed" and not s["output_file_id"]]
        if no_output:
            message += f" Completed without an output file (every request failed): {', '.join(no_output)}."
        return message

    async def _cancel(self, hook: OpenAIBatchAsyncHook, item_id: str) -> str:
        batch = await hook.acancel_batch(item_id)
        return f"Cancelled batch {item_id} (status {batch.status})"
