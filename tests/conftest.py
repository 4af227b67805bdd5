"""Shared pytest configuration. Edit with small, targeted changes: every engineer adds to this file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

# batch_server / batch_server_factory: the local OpenAI/Azure Batch API server (airflow_provider_synth.testing)
pytest_plugins = ["airflow_provider_synth.testing.pytest_plugin"]

REPO = Path(__file__).resolve().parent.parent
# Airflow reads its configuration when first imported: point it at a throw-away home before any test module
# imports it. The example DAGs are the dags folder, so dag.test() runs them as users copy them.
os.environ["AIRFLOW_HOME"] = os.environ.get("SYNTH_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="synth-airflow-")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "example_dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("AIRFLOW__CORE__ALLOWED_DESERIALIZATION_CLASSES_REGEXP", ".*")


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated SQLite metadata database in the test AIRFLOW_HOME (once per session)."""
    from airflow.utils import db

    db.resetdb()
    return os.environ["AIRFLOW_HOME"]



@pytest.fixture
def group_members() -> Callable[[int], list[psutil.Process]]:
    """The live (not zombie) processes of a process group: what is left of an engine after its task died."""

    def members(pgid: int) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    return members
