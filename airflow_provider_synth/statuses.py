"""Moved to :mod:`airflow_provider_synth.batch.status` in 0.2.0; this 0.1.0 path still works."""

from __future__ import annotations

from airflow_provider_synth.batch.status import IN_PROGRESS_STATUSES, TERMINAL_STATUSES

__all__ = ["IN_PROGRESS_STATUSES", "TERMINAL_STATUSES"]
