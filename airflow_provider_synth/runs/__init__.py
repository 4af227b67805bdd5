"""Run state machines, with no Airflow context: what a task does between its arguments and its manifest.

* :mod:`~airflow_provider_synth.runs.openai`: plan, batches, retry rounds and resubmissions, kept in the
  output folder so any worker can resume a run, and the worker-side wait (THE verdict of ``batch.status``);
* :mod:`~airflow_provider_synth.runs.cleanup`: delete the files runs left on an account, and nothing else;
* :mod:`~airflow_provider_synth.runs.cortex`: a Snowflake Cortex run (stage, submit with an intent recorded
  first, re-attach after a crash, wait, read back); :mod:`~airflow_provider_synth.runs.cortex_staging`: the
  staging tables failed runs left, listed and dropped per run;
* :mod:`~airflow_provider_synth.runs.vllm_workspace` and :mod:`~airflow_provider_synth.runs.vllm_runner`: the
  vLLM engine's workspace and the engine process itself.

Operators, sensors and the CLI drive these; nothing here imports an operator.
"""

from __future__ import annotations
