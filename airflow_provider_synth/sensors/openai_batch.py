"""Sensor that waits for OpenAI / Azure OpenAI batches submitted by an earlier task (``wait_for_completion=False``)."""

from __future__ import annotations

import ast
import json
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseSensorOperator, PokeReturnValue, conf, redact

from airflow_provider_synth.batch.paths import exists, join_path, open_path
from airflow_provider_synth.batch.status import TERMINAL_STATUSES, Next, PollError, verdict
from airflow_provider_synth.exceptions import BatchFailedError, BatchTimeoutError, TriggerEventError
from airflow_provider_synth.hooks.openai import (
    SERVICE_POLL_INTERVAL,
    OpenAIBatchHook,
    batch_summary,
    is_transient,
)
from airflow_provider_synth.triggers.base import validate_event
from airflow_provider_synth.triggers.openai_batch import OpenAIBatchTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

#: Extra seconds the deferral's hard timeout leaves after the trigger's own deadline, so the trigger's
#: "timeout" event (with each batch's state) arrives before Airflow gives up on the trigger.
_DEFER_GRACE_S = 300


def resolve_batch_ids(value: Any) -> list[str]:
    """Batch ids from a list, one id, a JSON/Python-literal string of either, or a manifest with ``batch_ids``.

    :param value: what the DAG passed (often ``submit_task.output``, the submitting operator's manifest).
    :raises ValueError: naming what was received when no batch id can be found.
    """
    value = _parsed(value)
    if isinstance(value, Mapping):
        value = value.get("batch_ids")
    if isinstance(value, Sequence) and not isinstance(value, str):
        ids = [str(v) for v in value if v]
        if ids:
            return ids
    raise ValueError(f"no batch ids in {value!r}: pass a list of ids or a manifest with 'batch_ids'")


def _parsed(value: Any) -> Any:
    """``value`` with a JSON or Python-literal string (a rendered XCom) parsed; ids split on commas."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[{":
            try:
                return json.loads(text)
            except ValueError:
                return ast.literal_eval(text)  # a rendered Python repr of an XCom value
        return [part.strip() for part in text.split(",")]
    return value


class OpenAIBatchSensor(BaseSensorOperator):
    """Wait until every batch reaches a terminal status; return each batch's final state.

    Pairs with a submitting task run with ``wait_for_completion=False``: pass its manifest (``batch_ids``
    key) or a list of ids. The sensor does not judge the outcome (a ``failed`` or ``expired`` batch is a
    terminal state like ``completed``): the results step downloads, merges and applies ``max_failed_ratio``.
    Deferrable mode defers :class:`~airflow_provider_synth.triggers.openai_batch.OpenAIBatchTrigger`; poke
    mode polls with the sync hook. The sensor never cancels the batches: it does not own them.

    :param batch_ids: batch ids, or a manifest dict / XCom holding ``batch_ids`` (templated).
    :param conn_id: the connection the batches were created with (``synth_openai``, ``synth_azure_openai``
        or ``openai``).
    :param poll_interval: seconds between polls (also the poke interval); default: deferred, 60 against a
        service and 2 against a server on this machine (as :class:`OpenAIBatchOperator`); in poke mode 60.
    :param deferrable: defer to the triggerer instead of holding a worker slot; default from
        ``[operators] default_deferrable``.
    :param max_consecutive_errors: transient polling errors in a row tolerated (both modes). In
        ``mode="reschedule"`` each poke runs in a new process: the count is kept in the submitting run's work
        folder (``<work_dir>/_sensor/<task_id>.<map_index>.json``) when ``batch_ids`` is its manifest; with
        bare ids there is nowhere to keep it and each poke tolerates the errors of that poke only.
    :return: ``{batch_id: {"status", "request_counts", "output_file_id", "error_file_id", "errors"}}``.
    """

    template_fields: Sequence[str] = ("batch_ids",)

    def __init__(
        self,
        *,
        batch_ids: Any,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        poll_interval: float | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        max_consecutive_errors: int = 5,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", SERVICE_POLL_INTERVAL if poll_interval is None else poll_interval)
        super().__init__(**kwargs)
        self.batch_ids = batch_ids
        self.conn_id = conn_id
        self.poll_interval = None if poll_interval is None else float(poll_interval)
        self.deferrable = deferrable
        self.max_consecutive_errors = max_consecutive_errors
        self._states: dict[str, dict[str, Any]] = {}
        self._consecutive_errors = 0

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        """The sync hook used in poke mode."""
        return OpenAIBatchHook(self.conn_id)

    def _timeout_s(self) -> float:
        timeout = self.timeout
        return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)

    def execute(self, context: Context) -> Any:
        ids = resolve_batch_ids(self.batch_ids)
        self.log.info("Waiting for %d batch(es): %s", len(ids), ", ".join(ids))
        if not self.deferrable:
            return super().execute(context)
        timeout_s = self._timeout_s()
        self.defer(
            trigger=OpenAIBatchTrigger(
                conn_id=self.conn_id,
                batch_ids=ids,
                poll_interval=self.poll_interval or self.hook.default_poll_interval,
                end_time=time.time() + timeout_s,
                max_consecutive_errors=self.max_consecutive_errors,
                cancel_on_kill=False,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=timeout_s + _DEFER_GRACE_S),
        )

    def poke(self, context: Context) -> PokeReturnValue:
        """Retrieve the batches not yet terminal; done when all of them are.

        A transient error (network, 429, 5xx) is logged and the next poke tries again, up to
        ``max_consecutive_errors`` pokes in a row; any other error propagates as raised.
        """
        ids = resolve_batch_ids(self.batch_ids)
        counter = self._error_counter(context)
        if counter is not None:
            self._consecutive_errors = _read_count(counter, context)
        errors: list[tuple[str, Exception]] = []
        for batch_id in ids:
            if self._states.get(batch_id, {}).get("status") in TERMINAL_STATUSES:
                continue
            try:
                state = batch_summary(self.hook.get_batch(batch_id))
            except Exception as error:
                if not is_transient(error):
                    raise
                self.log.warning("Polling batch %s failed: %s", batch_id, redact(repr(error)))
                errors.append((batch_id, error))
                continue
            counts = state["request_counts"]
            self.log.info(
                "batch %s: %s, %d/%d completed, %d failed",
                batch_id, state["status"], counts["completed"], counts["total"], counts["failed"],
            )
            self._states[batch_id] = state
        self._consecutive_errors = self._consecutive_errors + 1 if errors else 0
        if counter is not None:
            _write_count(counter, context, self._consecutive_errors)
        result = verdict(
            {b: self._states.get(b, {}).get("status") for b in ids},
            error=PollError.of(True for _ in errors),
            last_error=(errors[-1][0], str(redact(repr(errors[-1][1])))) if errors else None,
            consecutive_errors=self._consecutive_errors,
            max_consecutive_errors=self.max_consecutive_errors,
        )
        if result.next in (Next.FAILED, Next.UNKNOWN):
            raise BatchFailedError(result.message)
        done = result.next is Next.DONE
        return PokeReturnValue(is_done=done, xcom_value=dict(self._states) if done else None)

    def _error_counter(self, context: Context) -> Any | None:
        """Where the consecutive-error count outlives a poke: in reschedule mode, a file in the submitting
        run's work folder (the XCom of a rescheduled task is cleared before each poke); ``None`` otherwise."""
        if self.mode != "reschedule" or context.get("ti") is None:
            return None
        manifest = _parsed(self.batch_ids)
        work_dir = manifest.get("work_dir") if isinstance(manifest, Mapping) else None
        if not work_dir:
            return None
        ti = context["ti"]
        return join_path(join_path(work_dir, "_sensor"), f"{ti.task_id}.{ti.map_index}.json")

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Turn the trigger's terminal event into the batches' states, or a typed error."""
        event = validate_event(event, OpenAIBatchTrigger.event_key)
        status, message = event.get("status"), event.get("message", "")
        if status == "success":
            self.log.info("%s", message)
            batches: dict[str, Any] = event["batches"]
            return batches
        if status == "timeout":
            raise BatchTimeoutError(message)
        raise TriggerEventError(f"Waiting for the batches failed ({status}): {message}")


def _read_count(path: Any, context: Context) -> int:
    """The count kept by an earlier poke of this try (a new try starts from 0)."""
    if not exists(path):
        return 0
    with open_path(path, "rb") as fp:
        data = json.loads(fp.read() or b"{}")
    return int(data.get("consecutive_errors") or 0) if data.get("try_number") == context["ti"].try_number else 0


def _write_count(path: Any, context: Context, count: int) -> None:
    with open_path(path, "wb") as fp:
        fp.write(json.dumps({"try_number": context["ti"].try_number, "consecutive_errors": count}).encode())
