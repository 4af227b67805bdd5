"""Code that runs in an engine's own interpreter, not in Airflow's: one package per engine, importing only the
provider-neutral core (:mod:`airflow_provider_synth.batch`) and the standard library (and the engine itself,
inside functions)."""
