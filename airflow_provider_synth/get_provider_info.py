"""The provider's one registration dict, read by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_provider_synth import __version__


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-synth",
        "name": "Synth",
        "description": "Batch LLM data synthesis: OpenAI and Azure OpenAI Batch API, Snowflake Cortex "
        "AI_COMPLETE and vLLM offline inference, one JSONL format in and out.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Synth",
                "external-doc-url": "https://github.com/airflow-provider-synth/airflow-provider-synth",
                "tags": ["ai", "llm", "batch"],
            }
        ],
        "hooks": [
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.hooks.cortex"]},
        ],
        "operators": [
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.operators.vllm"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.operators.cortex"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.operators.cleanup"]},
        ],
        "sensors": [],
        "triggers": [
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.triggers.cortex"]},
        ],
        "extra-links": [],
        "connection-types": [],
    }
