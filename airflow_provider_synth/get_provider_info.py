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
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.hooks.anthropic"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.hooks.cortex"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.hooks.openai"]},
            # on the amazon provider's `aws` connection (the [bedrock] extra): no connection type of its own
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.hooks.bedrock"]},
        ],
        "operators": [
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.operators.anthropic"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.operators.openai_batch"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.operators.vllm"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.operators.cortex"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.operators.cleanup"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.operators.bedrock"]},
        ],
        "sensors": [
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.sensors.openai_batch"]},
        ],
        "triggers": [
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.triggers.anthropic"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.triggers.cortex"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.triggers.openai_batch"]},
            {"integration-name": "Synth", "python-modules": ["airflow_provider_synth.triggers.bedrock"]},
        ],
        # @task.synth_openai_batch / synth_cortex_batch / synth_vllm_batch / synth_anthropic_batch /
        # synth_bedrock_batch (common-ai owns llm_batch)
        "task-decorators": [
            {"class-name": "airflow_provider_synth.decorators.openai_batch.synth_openai_batch_task",
             "name": "synth_openai_batch"},
            {"class-name": "airflow_provider_synth.decorators.cortex.synth_cortex_batch_task",
             "name": "synth_cortex_batch"},
            {"class-name": "airflow_provider_synth.decorators.vllm.synth_vllm_batch_task",
             "name": "synth_vllm_batch"},
            {"class-name": "airflow_provider_synth.decorators.anthropic.synth_anthropic_batch_task",
             "name": "synth_anthropic_batch"},
            {"class-name": "airflow_provider_synth.decorators.bedrock.synth_bedrock_batch_task",
             "name": "synth_bedrock_batch"},
        ],
        "extra-links": ["airflow_provider_synth.links.OpenAIBatchLink"],
        "config": {
            "synth": {
                "description": "Deployment-wide settings of airflow-provider-synth.",
                "options": {
                    "allow_token_provider_import": {
                        "description": "Let a synth_azure_openai connection's azure_ad_token_provider extra name "
                        "a Python callable that workers and the triggerer import and call. Off by default: "
                        "with it on, whoever may edit connections chooses code that runs on them.",
                        "version_added": "0.2.0",
                        "type": "boolean",
                        "example": "True",
                        "default": "False",
                    },
                },
            },
        },
        "connection-types": [
            # OpenAI / Azure OpenAI Batch API; every field is documented in docs/connections.md
            {
                "hook-class-name": "airflow_provider_synth.hooks.openai.OpenAIBatchHook",
                "hook-name": "OpenAI Batch (synth)",
                "connection-type": "synth_openai",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "API Key", "host": "Base URL"},
                    "placeholders": {"host": "https://api.openai.com/v1 (leave empty for OpenAI)"},
                },
                "conn-fields": {
                    "organization": {"label": "Organization", "schema": {"type": ["string", "null"]}},
                    "project": {"label": "Project", "schema": {"type": ["string", "null"]}},
                    "timeout": {
                        "label": "Request timeout (s)",
                        "schema": {"type": ["number", "null"]},
                        "description": "Timeout of one API request; the SDK default is 600 s.",
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "schema": {"type": ["integer", "null"], "minimum": 0},
                        "description": "SDK retries on connection errors, 408, 409, 429 and 5xx (default 2).",
                    },
                },
            },
            {
                "hook-class-name": "airflow_provider_synth.hooks.openai.AzureOpenAIBatchHook",
                "hook-name": "Azure OpenAI Batch (synth)",
                "connection-type": "synth_azure_openai",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "API Key (empty for Entra ID)", "host": "Azure endpoint"},
                    "placeholders": {"host": "https://<resource>.openai.azure.com"},
                },
                "conn-fields": {
                    "api_version": {"label": "API version", "schema": {"type": "string"}},
                    "tenant_id": {"label": "Entra ID tenant id", "schema": {"type": ["string", "null"]}},
                    "client_id": {
                        "label": "Entra ID client id",
                        "schema": {"type": ["string", "null"]},
                        "description": "Service principal (with client secret) or user-assigned managed identity.",
                    },
                    "client_secret": {
                        "label": "Entra ID client secret",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "managed_identity_client_id": {
                        "label": "Managed identity client id",
                        "schema": {"type": ["string", "null"]},
                    },
                    "token_scope": {
                        "label": "Token scope",
                        "schema": {"type": ["string", "null"]},
                        "description": "Default https://cognitiveservices.azure.com/.default",
                    },
                    "resource_id": {
                        "label": "Resource id (for dashboard links)",
                        "schema": {"type": ["string", "null"]},
                        "description": "/subscriptions/.../providers/Microsoft.CognitiveServices/accounts/<name>",
                    },
                    "timeout": {"label": "Request timeout (s)", "schema": {"type": ["number", "null"]}},
                    "max_retries": {"label": "Max retries", "schema": {"type": ["integer", "null"], "minimum": 0}},
                },
            },
        ],
    }
