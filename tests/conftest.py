"""Shared pytest configuration. Edit with small, targeted changes: every engineer adds to this file."""

from __future__ import annotations

# batch_server / batch_server_factory: the local OpenAI/Azure Batch API server (airflow_provider_synth.testing)
pytest_plugins = ["airflow_provider_synth.testing.pytest_plugin"]
