"""Moved to :mod:`airflow_provider_synth.server` in 0.2.0; this 0.1.0 path still works.

``python -m airflow_provider_synth.testing.server`` still starts the server too.
"""

from __future__ import annotations

import sys

from airflow_provider_synth.server.server import BatchServer, Fault, Outcome, ServerConfig, main

__all__ = ["BatchServer", "Fault", "Outcome", "ServerConfig", "main"]

if __name__ == "__main__":
    sys.exit(main())
