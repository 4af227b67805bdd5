"""The workarounds for what openai, the snowflake provider and Airflow do not offer publicly: all of them here.

Everything else in the package uses public APIs only. Each function names what it stands in for, and
``tests/unit/test_compat.py`` fails against the installed versions as soon as one of them stops working.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection

#: Airflow's switch between the secrets chains of a server process (metadata database included) and of any
#: other process (environment variables and configured backends only).
_PROCESS_CONTEXT = "_AIRFLOW_PROCESS_CONTEXT"


@contextlib.contextmanager
def metastore_connections() -> Iterator[None]:
    """Let ``BaseHook.get_connection`` also look in the metadata database, as the ``airflow`` command does.

    Outside a task, the Task SDK resolves connections from environment variables and secrets backends only,
    unless the process says it is a server (Airflow has no public switch for a command-line tool). Restored
    afterwards, so that a program calling ``airflow-synth``'s ``main`` keeps its own context.
    """
    if os.environ.get(_PROCESS_CONTEXT):
        yield
        return
    os.environ[_PROCESS_CONTEXT] = "server"
    try:
        yield
    finally:
        os.environ.pop(_PROCESS_CONTEXT, None)


def snowflake_conn_params(hook: Any) -> dict[str, Any]:
    """The connector arguments a ``SnowflakeHook`` resolves from its connection (every auth method included).

    ``SnowflakeHook.get_conn()`` offers no way to add connector options (``paramstyle="qmark"``), and the
    resolved arguments have no public accessor: ``_get_conn_params`` is what ``get_conn`` itself uses.

    :param hook: a ``SnowflakeHook`` (or subclass).
    """
    params: dict[str, Any] = hook._get_conn_params()
    return params


def _supervisor_comms() -> Any:
    """The Task SDK's channel to the supervisor of this process (``None`` outside a task or trigger run)."""
    try:
        from airflow.sdk.execution_time import task_runner
    except ImportError:  # pragma: no cover - every supported Airflow has the Task SDK
        return None
    return getattr(task_runner, "SUPERVISOR_COMMS", None)


def in_process_supervisor() -> bool:
    """Whether tasks and triggers run inside this process: ``dag.test()`` and ``airflow dags test`` run them
    through ``InProcessSupervisorComms`` (and with no separate triggerer)."""
    return type(_supervisor_comms()).__name__ == "InProcessSupervisorComms"


def _comms_without_async_send() -> bool:
    """Whether the supervisor channel lacks ``asend``: ``InProcessSupervisorComms`` implements only the
    synchronous ``send`` (Airflow 3.1 to 3.3.2 at least)."""
    comms = _supervisor_comms()
    return comms is not None and not callable(getattr(comms, "asend", None))


async def aget_connection(conn_id: str, hook: Any = None) -> Connection:
    """The connection ``conn_id``, looked up without blocking the event loop, wherever the code runs.

    Stands in for ``airflow.providers.common.compat.connection.get_async_connection``, which asks the task's
    supervisor with ``SUPERVISOR_COMMS.asend``. Under ``dag.test()``/``airflow dags test`` (Airflow 3.3.2)
    the trigger runs in-process, where the supervisor has only ``send``: the async secrets backend swallows the
    ``AttributeError`` and the lookup ends in ``AirflowNotFoundException`` for every connection kept in the
    metadata database (``airflow connections add``), while environment-variable connections are found. There
    the synchronous lookup, which that supervisor serves, runs in a worker thread (as common.compat itself does
    on Airflow before 3.3.2). Everywhere else (a real triggerer, a worker) it is the async lookup, untouched.

    :param conn_id: the connection id.
    :param hook: the hook (class or instance) whose ``get_connection``/``aget_connection`` to use.
    """
    from airflow.providers.common.compat.connection import get_async_connection
    from airflow.providers.common.compat.sdk import BaseHook

    try:
        return await get_async_connection(conn_id, hook=hook)
    except Exception:  # AirflowNotFoundException: its module differs between Airflow versions
        if not _comms_without_async_send():
            raise
    from asgiref.sync import sync_to_async

    conn: Connection = await sync_to_async((hook or BaseHook).get_connection)(conn_id=conn_id)
    return conn


class _ManyWithMore:
    """hypothesis-jsonschema's object strategy calls ``cu.many(...).more()``/``.reject()``, Hypothesis's private
    collection helper as it was until Hypothesis replaced it with a ``with many(...) as e: for _ in e:`` loop;
    the same decisions, driven through the new form."""

    def __init__(self, data: Any, **kwargs: Any) -> None:
        from hypothesis.internal.conjecture import utils as cu

        self._many = cu.many(data, **kwargs)
        self._many.__enter__()
        self._steps = iter(self._many)

    def more(self) -> bool:
        if next(self._steps, StopIteration) is StopIteration:
            self._many.__exit__(None, None, None)
            return False
        return True

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


def jsonschema_strategy(schema: dict[str, Any]) -> Any:
    """hypothesis-jsonschema's ``from_schema(schema)``, strings in ASCII (serialized JSON escapes its control
    characters, so no answer holds a raw U+2028 or U+0085 that ``str.splitlines`` would split), on every
    Hypothesis version.

    hypothesis-jsonschema 0.23.1 (its newest) drives Hypothesis's private ``conjecture.utils.many`` through
    ``more()``, which newer Hypothesis releases no longer have: every object schema fails with
    ``AttributeError: 'many' object has no attribute 'more'``. Where ``many`` lacks ``more``, its module gets
    ``_ManyWithMore`` instead (the library's own module only; Hypothesis is untouched).
    """
    import types

    from hypothesis.internal.conjecture import utils as cu
    from hypothesis_jsonschema import _from_schema, from_schema

    if not hasattr(cu.many, "more") and getattr(_from_schema, "cu", None) is cu:
        setattr(_from_schema, "cu", types.SimpleNamespace(**{**vars(cu), "many": _ManyWithMore}))  # noqa: B010
    return from_schema(schema, allow_x00=False, codec="ascii")
