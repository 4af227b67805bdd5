"""The one async poll loop every trigger of this provider runs, and the one check of the events they send.

A subclass says how to reach its service (the hook, one poll, one cancel) and how to word its events; the loop
decides nothing itself: after each poll it asks :func:`~airflow_provider_synth.batch.status.verdict`.

The triggerer imports a trigger's class path inside its event loop, so this module imports nothing heavy: the
hooks (and the SDKs under them) are imported in a worker thread by :meth:`PollingTrigger.run`.
"""

from __future__ import annotations

import abc
import asyncio
import gc
import importlib
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_synth import _compat
from airflow_provider_synth.batch.status import EVENT_STATUS, PollError, Waited, verdict
from airflow_provider_synth.exceptions import ConnectionConfigError, TriggerEventError

#: The statuses of a terminal event.
EVENT_STATUSES = frozenset(EVENT_STATUS.values())


def _now() -> float:
    return time.time()


def _without_full_collection(work: Callable[[], None]) -> None:
    """Run ``work`` (an import of an SDK: a hundred thousand new objects) without a garbage collection, then
    freeze what the process holds.

    The thread that imports releases the GIL between bytecodes, but a collection of the oldest generation does
    not: over a triggerer's heap (Airflow, SQLAlchemy, the SDKs: 150,000+ objects) it held the event loop for
    0.2 to 0.4 s, and the triggerer logged "Triggerer's async thread was blocked". Frozen objects (the
    modules, classes and settings of a long-lived process) are left out of every later full collection, so
    those stay short too. Once per process and trigger class.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        work()
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def check_trigger_connection(conn_id: str) -> None:
    """Before a deferrable task submits anything: check that its trigger will find the connection ``conn_id``.

    Only where the trigger runs in this very process (``dag.test()``, ``airflow dags test``): there the
    trigger's async lookup (:func:`~airflow_provider_synth._compat.aget_connection`) is tried now, in the same
    secrets chain, so a lookup Airflow cannot serve fails the task before a batch is paid for instead of after.
    A real triggerer is another process with its own secrets chain: nothing to check from the worker.

    :param conn_id: the connection the trigger will use.
    :raises ConnectionConfigError: the lookup failed; says why and what to do.
    """
    if not _compat.in_process_supervisor():
        return
    try:
        asyncio.get_running_loop()
        return  # called from inside an event loop (an async task): no second loop in this thread
    except RuntimeError:
        pass
    try:
        asyncio.run(_compat.aget_connection(conn_id))
    except Exception as exc:
        raise ConnectionConfigError(
            f"this task runs its trigger in-process (dag.test() / airflow dags test), and the trigger's async "
            f"lookup of connection {conn_id!r} failed here: {type(exc).__name__}: {exc}. Nothing was submitted. "
            f"Define the connection as an environment variable (AIRFLOW_CONN_{conn_id.upper()}, e.g. the JSON "
            f"`airflow connections get {conn_id} -o json` shows), or run the task with deferrable=False "
            "to wait in the worker.") from exc


def trigger_event(payload: dict[str, Any]) -> TriggerEvent:
    """A :class:`TriggerEvent` (Airflow declares its constructor without types)."""
    return TriggerEvent(payload)  # type: ignore[no-untyped-call]


def validate_event(event: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    """Check a trigger event's shape; raise a typed error for a missing or malformed one.

    :param event: what ``execute_complete`` received.
    :param key: the event's per-item states (``batches``, ``statements``).
    :return: the event, as a dict.
    :raises TriggerEventError: no event, an unknown status, or no ``key`` mapping.
    """
    if not event or not isinstance(event, Mapping):
        raise TriggerEventError(f"the trigger sent no usable event: {event!r}")
    if event.get("status") not in EVENT_STATUSES or not isinstance(event.get(key), Mapping):
        raise TriggerEventError(f"the trigger sent no usable event: status={event.get('status')!r}, "
                                f"{key}={type(event.get(key)).__name__}")
    return dict(event)


class PollingTrigger(BaseTrigger):
    """Poll a set of remote items (batches, statements) until :func:`verdict` ends the wait; yield ONE event.

    Subclasses set :attr:`waited`, :attr:`hooks_module`, :attr:`event_key`, :attr:`target_fields` and
    :attr:`ids_field`, store those fields, then call this ``__init__``, and implement the abstract ``_`` methods
    below (the hook, one fetch, the event, the done message, one cancel).

    :param poll_interval: seconds between polls.
    :param end_time: absolute deadline in epoch seconds, fixed at the first submission, so a triggerer restart
        or a task retry never extends it; ``None``: no deadline.
    :param max_consecutive_errors: transient polling errors in a row tolerated before giving up.
    :param cancel_on_kill: cancel what still runs when a user kills the task (Airflow 3.3+).
    """

    #: what is waited for (its name in messages, its status table)
    waited: ClassVar[Waited]
    #: the module of the hook, imported in a thread before the first poll; its ``is_transient(error)`` is
    #: the trigger's classification of polling errors (the hook's own, as the worker-side wait uses)
    hooks_module: ClassVar[str]
    #: the SDK the hook drives, imported with it off the loop (``None``: the hook module imports what it needs)
    sdk_module: ClassVar[str | None] = None
    #: the key of the event's per-item states (``batches``, ``statements``, ``jobs``)
    event_key: ClassVar[str]
    #: the constructor arguments naming what is waited for (the connection, the ids, a region...), in the
    #: order :meth:`serialize` stores them, and the one of them holding the ids
    target_fields: ClassVar[tuple[str, ...]]
    ids_field: ClassVar[str]
    #: Each sleep is ``poll_interval`` times a random factor in ``1 +/- jitter``, and the first poll waits a
    #: random ``[0, start_spread * min(poll_interval, 1 s)]``: a triggerer that (re)starts a thousand triggers
    #: at once would otherwise poll, and finish, them all in the same loop iterations (AWS waiters jitter too).
    jitter: ClassVar[float] = 0.0
    start_spread: ClassVar[float] = 0.0
    #: Seconds ``on_kill`` may spend cancelling: inside Airflow's own bound (``[triggerer] on_kill_timeout``,
    #: 30 s by default), so a slow API is logged, not cut off silently.
    cancel_timeout: ClassVar[float] = 20.0

    def __init__(
        self,
        *,
        poll_interval: float,
        end_time: float | None,
        max_consecutive_errors: int,
        cancel_on_kill: bool,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # BaseTrigger.__init__ has no types
        self.poll_interval = float(poll_interval)
        self.end_time = float(end_time) if end_time is not None else None
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.cancel_on_kill = bool(cancel_on_kill)
        if not self.ids:
            raise ValueError(f"{type(self).__name__} needs at least one {self.waited.noun} id")
        self._states: dict[str, Any] = {}
        self._consecutive_errors = 0

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and kwargs; the kwargs are a stored schema: add new ones with defaults only."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                **self._target_kwargs(),
                "poll_interval": self.poll_interval,
                "end_time": self.end_time,
                "max_consecutive_errors": self.max_consecutive_errors,
                "cancel_on_kill": self.cancel_on_kill,
            },
        )

    # -- what a subclass supplies -----------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        """The ids waited for (the :attr:`ids_field` argument)."""
        ids: list[str] = getattr(self, self.ids_field)
        return ids

    def _target_kwargs(self) -> dict[str, Any]:
        """The kwargs naming what is waited for (:attr:`target_fields`), for :meth:`serialize`."""
        return {name: list(self.ids) if name == self.ids_field else getattr(self, name) for name in self.target_fields}

    @abc.abstractmethod
    def _hook(self) -> Any:
        """A new async hook (an async context manager); called after :attr:`hooks_module` is imported."""
        raise NotImplementedError

    @abc.abstractmethod
    async def _fetch(self, hook: Any, item_id: str) -> Any:
        """One item's current state."""
        raise NotImplementedError

    def _status(self, state: Any) -> str | None:
        """The status of a state :meth:`_fetch` returned (default: a mapping's ``status``)."""
        status: str | None = state.get("status")
        return status

    def _is_transient(self, error: BaseException) -> bool:
        """Whether a polling error may go away by itself: the hook module's ``is_transient``."""
        return bool(importlib.import_module(self.hooks_module).is_transient(error))

    def _describe(self, hook: Any, error: BaseException) -> str:
        """An error, for messages and logs: never a secret (Airflow's masker knows the connection's)."""
        from airflow.providers.common.compat.sdk import redact

        return str(redact(f"{type(error).__name__}: {error}"))

    def _progress(self, item_id: str, state: Any) -> str:
        return f"{self.waited.noun} {item_id}: {self._status(state)}"

    @abc.abstractmethod
    def _event(self, status: str, message: str) -> TriggerEvent:
        raise NotImplementedError

    @abc.abstractmethod
    def _done_message(self) -> str:
        raise NotImplementedError

    @abc.abstractmethod
    async def _cancel(self, hook: Any, item_id: str) -> str:
        """Cancel one item; returns what to log."""
        raise NotImplementedError

    @classmethod
    def _warm_up(cls) -> None:
        """Blocking, once per process, in a worker thread: import the SDK and the hooks (and what else costs
        CPU)."""
        if cls.sdk_module:
            importlib.import_module(cls.sdk_module)
        importlib.import_module(cls.hooks_module)

    # -- the loop ---------------------------------------------------------------------------------------------

    _warm: ClassVar[bool] = False

    @classmethod
    async def _prepare(cls) -> None:
        if not cls._warm:
            await asyncio.to_thread(_without_full_collection, cls._warm_up)
            cls._warm = True

    def _running(self) -> list[str]:
        return [i for i in self.ids if not self.waited.phases.get(self._status_or_none(i), False)]

    def _status_or_none(self, item_id: str) -> str | None:
        state = self._states.get(item_id)
        return None if state is None else self._status(state)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until :func:`verdict` ends the wait (all finished, the deadline, a polling failure, an unknown
        status); yield one event."""
        self._consecutive_errors = 0
        await asyncio.sleep(random.uniform(0, self.start_spread * min(self.poll_interval, 1.0)))
        await self._prepare()
        async with self._hook() as hook:
            event = await self._wait(hook)
        # the client is released before the event leaves: a runner that stops iterating after the first
        # event (dag.test() does) never leaves connections to a generator finalizer
        yield event

    async def _poll(self, hook: Any) -> list[tuple[str, BaseException]]:
        """Fetch every item not yet finished, concurrently; record and log the states that changed.

        A single item is awaited directly: ``gather`` would wrap it in a task, a context and a closure per
        poll, objects that outlive young GC generations while a thousand triggers poll and so bring on full
        collections of the triggerer's heap. A state is only replaced (and logged) when it changed.
        """
        pending = self._running()
        results: list[Any]
        if len(pending) == 1:
            try:
                results = [await self._fetch(hook, pending[0])]
            except Exception as error:
                results = [error]
        else:
            results = await asyncio.gather(*(self._fetch(hook, i) for i in pending), return_exceptions=True)
        errors: list[tuple[str, BaseException]] = []
        for item_id, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                errors.append((item_id, result))
            elif result != self._states.get(item_id):
                self.log.info("%s", self._progress(item_id, result))
                self._states[item_id] = result
        return errors

    def _verdict(self, hook: Any, errors: list[tuple[str, BaseException]]) -> TriggerEvent | None:
        """The terminal event after one poll, if the wait is over; ``None`` to keep polling."""
        transient = [self._is_transient(e) for _, e in errors]
        # the error the message names: the first one that ends the wait, else the first one
        worst = next((pair for pair, t in zip(errors, transient, strict=True) if not t),
                     errors[0] if errors else None)
        result = verdict(
            {i: self._status_or_none(i) for i in self.ids},
            kind=self.waited,
            error=PollError.of(transient),
            last_error=(worst[0], self._describe(hook, worst[1])) if worst else None,
            consecutive_errors=self._consecutive_errors,
            max_consecutive_errors=self.max_consecutive_errors,
            end_time=self.end_time,
            now=_now(),
        )
        if result.event_status is None:
            return None
        return self._event(result.event_status, result.message or self._done_message())

    async def _wait(self, hook: Any) -> TriggerEvent:
        while True:
            errors = await self._poll(hook)
            self._consecutive_errors = self._consecutive_errors + 1 if errors else 0
            for item_id, error in errors:
                self.log.warning("Polling %s %s failed: %s", self.waited.noun, item_id, self._describe(hook, error))
            event = self._verdict(hook, errors)
            if event is not None:
                return event
            delay = self.poll_interval * random.uniform(1 - self.jitter, 1 + self.jitter)
            if self.end_time is not None:
                delay = max(0.0, min(delay, self.end_time - _now()))
            await asyncio.sleep(delay)

    async def on_kill(self) -> None:
        """Cancel what may still be running, when a user kills the task (Airflow 3.3+)."""
        if not self.cancel_on_kill:
            return
        running = self._running()
        if not running:
            return
        await self._prepare()
        async with self._hook() as hook:
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(self._cancel(hook, i) for i in running), return_exceptions=True),
                    timeout=self.cancel_timeout,
                )
            except TimeoutError:
                self.log.warning("Cancelling %s took over %.0f s; they may still be running: %s", self.waited.plural,
                                 self.cancel_timeout, ", ".join(running))
                return
            for item_id, result in zip(running, results, strict=True):
                if isinstance(result, BaseException):
                    self.log.warning("Cancelling %s %s failed: %s", self.waited.noun, item_id,
                                     self._describe(hook, result))
                else:
                    self.log.info("%s", result)
