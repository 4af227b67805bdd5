"""Typed errors raised by the provider's Airflow layers (hooks, operators, triggers, sensors)."""

from __future__ import annotations

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException


class SynthError(AirflowException):
    """Base class for every error this provider raises from its Airflow layers."""


class BatchFailedError(SynthError):
    """A batch (or a Cortex statement, or a vLLM run) ended failed, or over ``max_failed_ratio``."""


class BatchExpiredError(SynthError):
    """A batch expired and the unfinished requests could not be completed in the retry rounds."""


class BatchTimeoutError(SynthError):
    """The operator's ``timeout`` passed before every batch reached a terminal status."""


class TriggerEventError(SynthError):
    """A trigger event was missing, malformed or reported an error."""


class WaitFailedError(BatchFailedError, TriggerEventError):
    """Waiting for a run failed (a fatal polling error, too many transient ones, an unknown status): what was
    submitted keeps running, and a retry re-attaches to it."""


class ConnectionConfigError(SynthError):
    """An Airflow connection lacks a field this provider needs, or has contradictory fields."""


class ConnectionAuthError(ConnectionConfigError, AirflowFailException):
    """The service refused the connection's credentials (HTTP 401) or their permissions (HTTP 403). The task
    fails without retrying: a retry would be refused the same way, and nothing is paid for until it is fixed."""


class BudgetExceededError(SynthError):
    """The estimated cost of a run is over ``max_cost_usd``; nothing was submitted."""


class VLLMEngineError(SynthError):
    """The vLLM engine could not start (no vLLM in the interpreter, the model did not load) or died mid-run."""


class ServerUnreachableError(SynthError):
    """The connection's API server could not be reached (not running, wrong host or port, network)."""


class BatchGoneError(SynthError):
    """A batch this run recorded is no longer on the server (a server restarted without its state)."""


class OutputFolderClaimedError(SynthError, AirflowFailException):
    """Another task instance of the same DAG run claimed the task's output folder (a mapped task whose
    ``output_path`` lacks ``{{ ti.map_index }}``, or two tasks given one folder). Nothing was submitted; the task
    fails without retrying, since a retry would meet the same claim."""
