"""pytest fixtures for the local Batch API server, installed with the ``[testing]`` extra.

``pip install "airflow-provider-synth[testing]"`` registers this module as a pytest plugin (entry point
``pytest11``), so the fixtures are there in every test session of that environment; without the entry point
(a source checkout), enable it in a ``conftest.py`` with
``pytest_plugins = ["airflow_provider_synth.testing.pytest_plugin"]``.

* ``batch_server``: a started :class:`~airflow_provider_synth.server.server.BatchServer` with a fast schedule,
  stopped after the test.
* ``batch_server_factory``: ``batch_server_factory(**settings)`` starts one with your settings (all stopped after
  the test).

The server is imported when a fixture is first used, never when pytest loads the plugin: a session that uses
no fixture of it pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from airflow_provider_synth.server.server import BatchServer, ServerConfig

#: A schedule that runs a small batch through every status in about a third of a second.
FAST = {"validating_s": 0.02, "in_progress_s": 0.1, "finalizing_s": 0.02, "cancelling_s": 0.02}


@pytest.fixture
def batch_server_factory() -> Iterator[Callable[..., BatchServer]]:
    """Start local Batch API servers with the given :class:`ServerConfig` settings; stop them after the test."""
    from airflow_provider_synth.server.server import BatchServer, ServerConfig

    servers: list[BatchServer] = []

    def start(config: ServerConfig | None = None, **settings: Any) -> BatchServer:
        base = config or ServerConfig().replace(**FAST)
        server = BatchServer(base, **settings).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def batch_server(batch_server_factory: Callable[..., BatchServer]) -> BatchServer:
    """A started local Batch API server (fast schedule, any non-empty API key), stopped after the test."""
    return batch_server_factory()
