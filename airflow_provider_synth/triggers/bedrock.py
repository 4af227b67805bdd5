"""Deferrable trigger that waits for a task's Amazon Bedrock batch inference jobs, on the async client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import TriggerEvent

from airflow_provider_synth.batch.status import JOBS
from airflow_provider_synth.triggers.base import PollingTrigger, trigger_event

if TYPE_CHECKING:
    from airflow_provider_synth.hooks.bedrock import BedrockBatchAsyncHook

# The triggerer imports a trigger's class path inside its event loop: the hook (the amazon provider, botocore,
# aiobotocore) is imported in a thread by run() and on_kill() instead.
_HOOKS_MODULE = "airflow_provider_synth.hooks.bedrock"


class BedrockJobTrigger(PollingTrigger):
    """Wait until every Bedrock batch inference job of a task has finished; yield ONE event with each job's
    final state.

    Polls ``GetModelInvocationJob`` for all jobs concurrently on the amazon provider's aiobotocore client
    (:class:`~airflow_provider_synth.hooks.bedrock.BedrockBatchAsyncHook`); nothing blocks the event loop, and
    the wait has no cap of its own beyond ``end_time`` (Bedrock jobs run up to a week).

    The event is ``{"status": "success" | "error" | "timeout", "message": str, "jobs": {job_arn: {"job_arn",
    "status", "message", "output_uri", "submit_time", "end_time"}}}``. ``success``: every job finished
    (Completed, PartiallyCompleted, Failed, Stopped or Expired); the operator reads back what was answered.

    :param aws_conn_id: the ``aws`` connection.
    :param job_arns: the jobs' ARNs.
    :param region_name: overrides the connection's region.
    :param poll_interval: seconds between polls.
    :param end_time: absolute deadline in epoch seconds, fixed at the first submission, so a triggerer restart
        or a task retry never extends it; ``None`` waits as long as the jobs run.
    :param max_consecutive_errors: transient polling errors in a row tolerated before giving up.
    :param cancel_on_kill: stop the jobs still running when a user kills the task (Airflow 3.3+).
    """

    waited = JOBS
    hooks_module = _HOOKS_MODULE
    #: the key of the event's per-job states
    event_key = "jobs"
    target_fields, ids_field = ("aws_conn_id", "job_arns", "region_name"), "job_arns"
    jitter = 0.1

    def __init__(
        self,
        aws_conn_id: str | None,
        job_arns: Sequence[str],
        region_name: str | None = None,
        poll_interval: float = 60.0,
        end_time: float | None = None,
        max_consecutive_errors: int = 5,
        cancel_on_kill: bool = True,
    ) -> None:
        self.aws_conn_id = aws_conn_id
        self.job_arns = list(job_arns)
        self.region_name = region_name
        super().__init__(poll_interval=poll_interval, end_time=end_time,
                         max_consecutive_errors=max_consecutive_errors, cancel_on_kill=cancel_on_kill)

    def _hook(self) -> BedrockBatchAsyncHook:
        from airflow_provider_synth.hooks.bedrock import BedrockBatchAsyncHook

        return BedrockBatchAsyncHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)

    async def _fetch(self, hook: BedrockBatchAsyncHook, item_id: str) -> dict[str, Any]:
        from airflow_provider_synth.hooks.bedrock import job_state

        return job_state(await hook.aget_job(item_id))

    def _progress(self, item_id: str, state: dict[str, Any]) -> str:
        return f"Bedrock job {item_id}: {state.get('status')}" + (f" ({state['message']})" if state.get("message")
                                                                  else "")

    def _event(self, status: str, message: str) -> TriggerEvent:
        jobs = {arn: self._states.get(arn) or {"job_arn": arn, "status": None, "message": "not polled yet"}
                for arn in self.job_arns}
        return trigger_event({"status": status, "message": message, "jobs": jobs})

    def _done_message(self) -> str:
        counts: dict[str, int] = {}
        for arn in self.job_arns:
            status = str(self._states[arn].get("status"))
            counts[status] = counts.get(status, 0) + 1
        return f"All {len(self.job_arns)} Bedrock jobs finished: " + ", ".join(
            f"{n} {s}" for s, n in sorted(counts.items())) + "."

    async def _cancel(self, hook: BedrockBatchAsyncHook, item_id: str) -> str:
        await hook.astop_job(item_id)
        return f"Stopped Bedrock job {item_id}"
