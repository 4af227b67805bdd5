"""The workarounds for what openai, the snowflake provider and Airflow do not offer publicly: all of them here.

Everything else in the package uses public APIs only. Each function names what it stands in for, and
``tests/unit/test_compat.py`` fails against the installed versions as soon as one of them stops working.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

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
