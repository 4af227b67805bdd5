"""Deferrable trigger that waits for a set of OpenAI / Azure OpenAI batches, without blocking the event loop."""

from __future__ import annotations

import asyncio
import importlib
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_synth.batch.status import IN_PROGRESS_STATUSES, TERMINAL_STATUSES

if TYPE_CHECKING:
    from airflow_provider_synth.hooks.openai import OpenAIBatchAsyncHook

# The triggerer imports a trigger's class path inside its event loop. This module therefore imports neither
# ``openai`` nor the hooks (about a second of import, more on a busy machine, for every trigger of the
# process to wait out): :meth:`OpenAIBatchTrigger.run` imports them in a thread.
_HOOKS_MODULE = "airflow_provider_synth.hooks.openai"


def __getattr__(name: str) -> Any:
    if name == "OpenAIBatchAsyncHook":  # the hook class, imported on first use (tests replace it here)
        return importlib.import_module(_HOOKS_MODULE).OpenAIBatchAsyncHook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_warm = False


async def _import_hooks() -> None:
    """Import the hooks and the OpenAI SDK (which the hooks import lazily) and build the process's TLS context
    off the event loop, once per process."""
    global _warm
    if not _warm:
        await asyncio.to_thread(_import_modules)
        _warm = True


def _import_modules() -> None:
    importlib.import_module("openai")
    importlib.import_module(_HOOKS_MODULE).shared_ssl_context()


#: HTTP statuses worth another poll: the API is busy or briefly broken, the batch is fine.
_TRANSIENT_HTTP = frozenset({408, 409, 429, 500, 502, 503, 504})
#: Seconds ``on_kill`` may spend cancelling batches: inside Airflow's own bound
#: (``[triggerer] on_kill_timeout``, 30 s by default), so a slow API is logged, not cut off silently.
_CANCEL_TIMEOUT_S = 20.0


def _now() -> float:
    return time.time()


def is_transient(error: BaseException) -> bool:
    """Whether a polling error may go away by itself (network, timeout, 429, 5xx)."""
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes APITimeoutError
        return True
    return isinstance(error, openai.APIStatusError) and error.status_code in _TRANSIENT_HTTP


def _progress(batch_id: str, state: dict[str, Any]) -> str:
    counts = state["request_counts"]
    return (
        f"batch {batch_id}: {state['status']}, {counts['completed']}/{counts['total']} completed, "
        f"{counts['failed']} failed"
    )


class OpenAIBatchTrigger(BaseTrigger):
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

    #: Each sleep is ``poll_interval`` times a random factor in ``1 +/- jitter``, and the first poll waits a
    #: random ``[0, start_spread * min(poll_interval, 1 s)]``: a triggerer that (re)starts a thousand triggers
    #: at once would otherwise poll, and finish, them all in the same loop iterations (AWS waiters jitter too).
    jitter = 0.1
    start_spread = 0.5

    def __init__(
        self,
        conn_id: str,
        batch_ids: Sequence[str],
        poll_interval: float = 30.0,
        end_time: float | None = None,
        max_consecutive_errors: int = 5,
        cancel_on_kill: bool = True,
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.batch_ids = list(batch_ids)
        self.poll_interval = float(poll_interval)
        self.end_time = float(end_time) if end_time is not None else None
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.cancel_on_kill = bool(cancel_on_kill)
        if not self.batch_ids:
            raise ValueError("OpenAIBatchTrigger needs at least one batch id")
        self._states: dict[str, dict[str, Any]] = {}
        self._consecutive_errors = 0

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and kwargs; the kwargs are a stored schema: add new ones with defaults only."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "conn_id": self.conn_id,
                "batch_ids": list(self.batch_ids),
                "poll_interval": self.poll_interval,
                "end_time": self.end_time,
                "max_consecutive_errors": self.max_consecutive_errors,
                "cancel_on_kill": self.cancel_on_kill,
            },
        )

    def _hook(self) -> OpenAIBatchAsyncHook:
        # through the module, so that its __getattr__ (or a test's replacement) supplies the class
        hook: OpenAIBatchAsyncHook = sys.modules[__name__].OpenAIBatchAsyncHook(self.conn_id)
        return hook

    def _event(self, status: str, message: str) -> TriggerEvent:
        batches = {
            batch_id: self._states.get(batch_id)
            or {"status": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "output_file_id": None, "error_file_id": None, "errors": []}
            for batch_id in self.batch_ids
        }
        return TriggerEvent({"status": status, "message": message, "batches": batches})

    async def _poll(self, hook: OpenAIBatchAsyncHook) -> list[tuple[str, BaseException]]:
        """Retrieve every batch not yet terminal, concurrently; record and log the states that changed.

        A single batch is awaited directly: ``gather`` would wrap it in a task, a context and a closure per
        poll, objects that outlive young GC generations while a thousand triggers poll and so bring on full
        collections of the triggerer's heap. A state is only replaced (and logged) when it changed.
        """
        pending = [b for b in self.batch_ids if self._states.get(b, {}).get("status") not in TERMINAL_STATUSES]
        results: list[dict[str, Any] | BaseException]
        if len(pending) == 1:
            try:
                results = [await hook.aget_batch_state(pending[0])]
            except Exception as error:
                results = [error]
        else:
            results = await asyncio.gather(*(hook.aget_batch_state(b) for b in pending), return_exceptions=True)
        errors: list[tuple[str, BaseException]] = []
        for batch_id, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                errors.append((batch_id, result))
            elif result != self._states.get(batch_id):
                self.log.info("%s", _progress(batch_id, result))
                self._states[batch_id] = result
        return errors

    def _success_message(self) -> str:
        by_status: dict[str, int] = {}
        for state in self._states.values():
            by_status[state["status"]] = by_status.get(state["status"], 0) + 1
        parts = [f"{n} {status}" for status, n in sorted(by_status.items())]
        message = f"All {len(self.batch_ids)} batches finished: {', '.join(parts)}."
        no_output = [b for b, s in self._states.items() if s["status"] == "completed" and not s["output_file_id"]]
        if no_output:
            message += f" Completed without an output file (every request failed): {', '.join(no_output)}."
        return message

    def _verdict(self, hook: OpenAIBatchAsyncHook, errors: list[tuple[str, BaseException]]) -> TriggerEvent | None:
        """The terminal event after one poll, if the wait is over; ``None`` to keep polling."""
        for batch_id, error in errors:
            if not is_transient(error):
                return self._event("error", hook.redact(f"Polling batch {batch_id} failed: {error!r}"))
        if errors and self._consecutive_errors > self.max_consecutive_errors:
            batch_id, error = errors[0]
            request = getattr(error, "request", None)
            where = f"{request.url} " if request is not None else ""
            return self._event(
                "error",
                hook.redact(
                    f"Polling failed {self._consecutive_errors} times in a row "
                    f"(max_consecutive_errors={self.max_consecutive_errors}); last, batch {batch_id}: {error!r} "
                    f"({where}connection {self.conn_id!r})"
                ),
            )
        for batch_id, state in self._states.items():
            if state["status"] not in TERMINAL_STATUSES | IN_PROGRESS_STATUSES:
                return self._event("error", f"Batch {batch_id} has an unknown status {state['status']!r}.")
        if len(self._states) == len(self.batch_ids) and all(
            s["status"] in TERMINAL_STATUSES for s in self._states.values()
        ):
            return self._event("success", self._success_message())
        if self.end_time is not None and _now() >= self.end_time:
            running = [b for b in self.batch_ids if self._states.get(b, {}).get("status") not in TERMINAL_STATUSES]
            return self._event(
                "timeout",
                f"Deadline (end_time={self.end_time:.0f}) passed with {len(running)} of {len(self.batch_ids)} "
                f"batches still running: {', '.join(running)}.",
            )
        return None

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until every batch is terminal, the deadline passes, or polling fails; yield one event."""
        self._consecutive_errors = 0
        await asyncio.sleep(random.uniform(0, self.start_spread * min(self.poll_interval, 1.0)))
        await _import_hooks()
        hook = self._hook()
        try:
            event = await self._wait(hook)
        finally:
            await hook.close()
        # the client is released before the event leaves: a runner that stops iterating after the first
        # event (dag.test() does) never leaves connections to a generator finalizer
        yield event

    async def _wait(self, hook: OpenAIBatchAsyncHook) -> TriggerEvent:
        while True:
            errors = await self._poll(hook)
            self._consecutive_errors = self._consecutive_errors + 1 if errors else 0
            for batch_id, error in errors:
                self.log.warning("Polling batch %s failed: %s", batch_id, hook.redact(repr(error)))
            event = self._verdict(hook, errors)
            if event is not None:
                return event
            delay = self.poll_interval * random.uniform(1 - self.jitter, 1 + self.jitter)
            if self.end_time is not None:
                delay = max(0.0, min(delay, self.end_time - _now()))
            await asyncio.sleep(delay)

    async def on_kill(self) -> None:
        """Cancel the batches that may still be running, when a user kills the task (Airflow 3.3+)."""
        if not self.cancel_on_kill:
            return
        running = [b for b in self.batch_ids if self._states.get(b, {}).get("status") not in TERMINAL_STATUSES]
        if not running:
            return
        await _import_hooks()
        async with self._hook() as hook:
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(hook.acancel_batch(b) for b in running), return_exceptions=True),
                    timeout=_CANCEL_TIMEOUT_S,
                )
            except TimeoutError:
                self.log.warning("Cancelling batches %s timed out after %.0f s", ", ".join(running), _CANCEL_TIMEOUT_S)
                return
            for batch_id, result in zip(running, results, strict=True):
                if isinstance(result, BaseException):
                    self.log.warning("Cancelling batch %s failed: %s", batch_id, hook.redact(repr(result)))
                else:
                    self.log.info("Cancelled batch %s (status %s)", batch_id, result.status)
