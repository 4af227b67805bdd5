"""The local Batch API server and its upstream gateway: a product of its own (extra ``[server]``).

It serves the OpenAI (and Azure OpenAI) Files and Batches API on 127.0.0.1 for offline trials and tests, and,
with ``--upstream``, a Batch API in front of any OpenAI-compatible server (vLLM, llama.cpp, Ollama).
Start it with ``python -m airflow_provider_synth.server`` or ``airflow-synth serve``; use it from Python
through :class:`airflow_provider_synth.server.server.BatchServer`. Nothing an operator runs imports it.
"""

from __future__ import annotations
