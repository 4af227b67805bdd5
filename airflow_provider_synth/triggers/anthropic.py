"""Deferrable trigger that waits for a set of Anthropic Message Batches, without blocking the event loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import TriggerEvent

from airflow_provider_synth.hooks.anthropic import MESSAGE_BATCHES
from airflow_provider_synth.triggers.base import PollingTrigger, trigger_event

if TYPE_CHECKING:
    from airflow_provider_synth.hooks.anthropic import AnthropicBatchAsyncHook

# the hook module imports the SDK only inside its functions; PollingTrigger.run imports the SDK in a thread
_HOOKS_MODULE = "airflow_provider_synth.hooks.anthropic"


class AnthropicBatchTrigger(PollingTrigger):
    """Wait until every Message Batch has ``ended``; yield ONE event with each batch's final state.

    Polls its batches concurrently through ``AsyncAnthropic`` (async connection lookup), on the one poll loop
    of :class:`~airflow_provider_synth.triggers.base.PollingTrigger`; 429, 529 and 5xx answers are polled again
    (``max_consecutive_errors`` in a row).

    The event is ``{"status": "success" | "error" | "timeout", "message": str, "batches": {batch_id: {"status",
    "request_counts": {processing, succeeded, errored, canceled, expired, total}, "created_at", "ended_at",
    "results_url"}}}``.

    :param conn_id: the ``anthropic`` connection the batches were created with.
    :param batch_ids: the batches to wait for.
    :param poll_interval: seconds between polls.
    :param end_time: absolute deadline in epoch seconds, fixed at the first submission.
    :param max_consecutive_errors: transient polling errors in a row tolerated before giving up.
    :param cancel_on_kill: cancel the batches still running when a user kills the task (Airflow 3.3+).
    """

    waited = MESSAGE_BATCHES
    hooks_module = _HOOKS_MODULE
    sdk_module = "anthropic"
    event_key = "batches"
    target_fields, ids_field = ("conn_id", "batch_ids"), "batch_ids"
    jitter = 0.1
    start_spread = 0.5

    def __init__(self, conn_id: str, batch_ids: Sequence[str], poll_interval: float = 60.0,
                 end_time: float | None = None, max_consecutive_errors: int = 5, cancel_on_kill: bool = True) -> None:
        self.conn_id = conn_id
        self.batch_ids = list(batch_ids)
        super().__init__(poll_interval=poll_interval, end_time=end_time,
                         max_consecutive_errors=max_consecutive_errors, cancel_on_kill=cancel_on_kill)

    def _hook(self) -> AnthropicBatchAsyncHook:
        from airflow_provider_synth.hooks.anthropic import AnthropicBatchAsyncHook

        return AnthropicBatchAsyncHook(self.conn_id)

    async def _fetch(self, hook: AnthropicBatchAsyncHook, item_id: str) -> dict[str, Any]:
        return await hook.aget_batch_state(item_id)

    def _progress(self, item_id: str, state: dict[str, Any]) -> str:
        c = state.get("request_counts") or {}
        return (f"message batch {item_id}: {state['status']}, {c.get('succeeded', 0)} succeeded, "
                f"{c.get('errored', 0)} errored, {c.get('processing', 0)} processing of {c.get('total', 0)}")

    def _event(self, status: str, message: str) -> TriggerEvent:
        batches = {b: self._states.get(b) or {"status": None, "request_counts": {}} for b in self.batch_ids}
        return trigger_event({"status": status, "message": message, "batches": batches})

    def _done_message(self) -> str:
        totals: dict[str, int] = {}
        for state in self._states.values():
            for key, n in state["request_counts"].items():
                totals[key] = totals.get(key, 0) + int(n)
        parts = ", ".join(f"{totals.get(k, 0)} {k}" for k in ("succeeded", "errored", "expired", "canceled"))
        return f"All {len(self.batch_ids)} message batches ended: {parts}."

    async def _cancel(self, hook: AnthropicBatchAsyncHook, item_id: str) -> str:
        batch = await hook.acancel_batch(item_id)
        return f"Cancelled message batch {item_id} (status {batch.processing_status})"
