"""TaskFlow decorators: ``@task.synth_openai_batch``, ``@task.synth_cortex_batch``, ``@task.synth_vllm_batch``.

The decorated function returns the records (or request lines) to answer; the decorator's arguments are the
operator's; the task's return value (XCom) is the run's manifest. One module per backend, so that using one
never imports another's optional dependencies.
"""
