"""``python -m airflow_provider_synth.engine.vllm --config run.json``: one engine run (see :mod:`.runner`)."""

from __future__ import annotations

from airflow_provider_synth.engine.vllm.runner import _exit, main

if __name__ == "__main__":  # vLLM starts engine processes with spawn: this guard is required
    _exit(main())
