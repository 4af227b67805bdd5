"""Run state machines, with no Airflow context: what a task does between its arguments and its manifest.

* :mod:`~airflow_provider_synth.runs.openai`: plan, batches, retry rounds and resubmissions, kept in the
  output folder so any worker can resume a run, and the worker-side wait (THE verdict of ``batch.status``);
* :mod:`~airflow_provider_synth.runs.cleanup`: delete the files runs left on an account, and nothing else;
* :mod:`~airflow_provider_synth.runs.cortex`: a Snowflake Cortex run (stage, submit with an intent recorded
  first, re-attach after a crash, wait, read back); :mod:`~airflow_provider_synth.runs.cortex_staging`: the
  staging tables failed runs left, listed and dropped per run;
* :mod:`~airflow_provider_synth.runs.cortex_mapping` and :mod:`~airflow_provider_synth.runs.cortex_sql`: a
  Cortex run's request mapping (OpenAI chat bodies to ``AI_COMPLETE`` and back) and its SQL;
* :mod:`~airflow_provider_synth.runs.vllm`: a vLLM run, the operator's side of the engine process (start,
  event relay, kill, resume fingerprint, finish), and :mod:`~airflow_provider_synth.runs.vllm_workspace`:
  where the engine reads and writes. The engine process itself runs in vLLM's interpreter:
  :mod:`airflow_provider_synth.engine.vllm`.

Operators, sensors and the CLI drive these; nothing here imports an operator.
"""

from __future__ import annotations
