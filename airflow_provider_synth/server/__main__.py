"""``python -m airflow_provider_synth.server``: run the local Batch API server."""

from __future__ import annotations

import sys

from airflow_provider_synth.server.server import main

if __name__ == "__main__":
    sys.exit(main())
