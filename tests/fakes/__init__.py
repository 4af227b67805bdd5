"""Test doubles only this project's tests use (``unittest.mock`` patches of the services' own clients); on
``sys.path`` through pytest's ``pythonpath = ["tests"]``. What users may test their DAGs with ships in the
``[testing]`` extra (:mod:`airflow_provider_synth.testing`)."""
