"""Amazon Bedrock batch inference through the amazon provider's ``aws`` connection.

Credentials, region, role assumption, endpoints (``endpoint_url``, ``service_config``) are the amazon provider's
own (:class:`~airflow.providers.amazon.aws.hooks.bedrock.BedrockHook`): nothing of this provider configures
them. The sync hook wraps each control-plane call in one method; the async hook (a subclass) does the same
calls on the provider's aiobotocore client for the trigger. Both classify errors into the verdict's inputs with
:func:`is_transient`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.hooks.bedrock import BedrockHook

from airflow_provider_synth.batch.results import is_transient_status

if TYPE_CHECKING:
    from types import TracebackType

#: Error codes of a call that may succeed when made again later.
TRANSIENT_CODES = frozenset({"ThrottlingException", "ServiceUnavailableException", "InternalServerException",
                             "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
                             "ServiceQuotaExceededException"})


def is_transient(error: BaseException) -> bool:
    """Whether a Bedrock call's error may go away by itself: throttling, 5xx, a network error or timeout.

    ``ServiceQuotaExceededException`` is one: the quota it names is jobs in flight, which free as they end.
    """
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return code in TRANSIENT_CODES or is_transient_status(status)
    return isinstance(error, ConnectionError | HTTPClientError | TimeoutError | OSError)


def error_code(error: BaseException) -> str:
    """The AWS error code of a ``ClientError`` (``""`` for anything else)."""
    response = getattr(error, "response", None)
    return str((response or {}).get("Error", {}).get("Code", "")) if isinstance(response, Mapping) else ""


def job_state(job: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-primitive state of a ``GetModelInvocationJob`` answer that events and manifests carry."""
    def when(key: str) -> float | None:
        value = job.get(key)
        if value is None:
            return None
        return float(value.timestamp()) if hasattr(value, "timestamp") else float(value)

    return {"job_arn": job["jobArn"], "status": job.get("status"), "message": job.get("message") or "",
            "output_uri": job["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"],
            "submit_time": when("submitTime"), "end_time": when("endTime")}


class BedrockBatchHook(BedrockHook):
    """Bedrock's batch inference jobs, on the amazon provider's ``aws`` connection.

    :param aws_conn_id: the ``aws`` connection (default ``aws_default``).
    :param region_name: overrides the connection's region.
    """

    def create_job(self, *, job_name: str, role_arn: str, model_id: str, input_uri: str, output_uri: str,
                   client_request_token: str, timeout_hours: int | None = None,
                   tags: Mapping[str, str] | None = None) -> str:
        """``CreateModelInvocationJob``; returns the job ARN. The same ``client_request_token`` returns the job
        created first, whatever the number of calls: botocore's own retries (a lost response) and the task's
        retries re-attach to it instead of creating a second job."""
        kwargs: dict[str, Any] = {
            "jobName": job_name, "roleArn": role_arn, "modelId": model_id,
            "clientRequestToken": client_request_token,
            "inputDataConfig": {"s3InputDataConfig": {"s3Uri": input_uri, "s3InputFormat": "JSONL"}},
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": output_uri}},
        }
        if timeout_hours is not None:
            kwargs["timeoutDurationInHours"] = int(timeout_hours)
        if tags:
            kwargs["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
        return str(self.conn.create_model_invocation_job(**kwargs)["jobArn"])

    def get_job(self, job_arn: str) -> dict[str, Any]:
        """``GetModelInvocationJob``."""
        return dict(self.conn.get_model_invocation_job(jobIdentifier=job_arn))

    def stop_job(self, job_arn: str) -> None:
        """``StopModelInvocationJob``."""
        self.conn.stop_model_invocation_job(jobIdentifier=job_arn)

    def find_jobs(self, name_contains: str) -> list[dict[str, Any]]:
        """``ListModelInvocationJobs(nameContains=...)``, every page, newest first."""
        paginator = self.conn.get_paginator("list_model_invocation_jobs")
        found: list[dict[str, Any]] = []
        for page in paginator.paginate(nameContains=name_contains, sortBy="CreationTime", sortOrder="Descending"):
            found.extend(page.get("invocationJobSummaries") or [])
        return found


class BedrockBatchAsyncHook(BedrockBatchHook):
    """The same calls on the amazon provider's async (aiobotocore) client, for the trigger: an async context
    manager owning one client.

    :param aws_conn_id: the ``aws`` connection.
    :param region_name: overrides the connection's region.
    """

    _aclient_cm: Any = None
    _aclient: Any = None

    async def __aenter__(self) -> BedrockBatchAsyncHook:
        # the provider resolves the connection and credentials in a worker thread (asgiref's sync_to_async)
        self._aclient_cm = await self.get_async_conn()  # type: ignore[no-untyped-call]
        self._aclient = await self._aclient_cm.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._aclient_cm is not None:
            await self._aclient_cm.__aexit__(exc_type, exc, tb)
        self._aclient_cm = self._aclient = None

    async def aget_job(self, job_arn: str) -> dict[str, Any]:
        """``GetModelInvocationJob``, awaited."""
        return dict(await self._aclient.get_model_invocation_job(jobIdentifier=job_arn))

    async def astop_job(self, job_arn: str) -> None:
        """``StopModelInvocationJob``, awaited."""
        await self._aclient.stop_model_invocation_job(jobIdentifier=job_arn)
