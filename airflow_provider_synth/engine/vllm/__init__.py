"""The vLLM engine process: what runs inside the vLLM interpreter (``python -m airflow_provider_synth.engine.vllm``).

* :mod:`~.config`: the run's configuration (``run.json``), the request record, exit codes, progress events;
* :mod:`~.resume`: what an existing output already answers, what is left, output checks asked again;
* :mod:`~.codecs`: OpenAI bodies onto the engine and outputs back (:class:`~.codecs.PlainCodec`);
* :mod:`~.chat`: chat answered as vLLM's ``run_batch`` answers it (vLLM's OpenAI protocol);
* :mod:`~.loop`: the pipelined engine loop and the output writer;
* :mod:`~.process`: the process guard (one engine per output file, dies with its task) and the engine's
  environment;
* :mod:`~.runner`: loading the model, one run, ``main``.

It imports only :mod:`airflow_provider_synth.batch` and the standard library (vLLM inside functions): no
Airflow, which cannot share vLLM's environment. The operator side of a vLLM run is
:mod:`airflow_provider_synth.runs.vllm`.
"""
