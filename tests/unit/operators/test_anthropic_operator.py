"""AnthropicBatchOperator: defer with the trigger's kwargs, resume per event status, refuse before paying."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("anthropic")

from airflow.providers.common.compat.sdk import TaskDeferred  # noqa: E402

from airflow_provider_synth.batch.errors import InvalidRequestsError  # noqa: E402
from airflow_provider_synth.batch.requests import RequestTemplate  # noqa: E402
from airflow_provider_synth.exceptions import BudgetExceededError, TriggerEventError, WaitFailedError  # noqa: E402
from airflow_provider_synth.operators.anthropic import AnthropicBatchConfig, AnthropicBatchOperator  # noqa: E402
from airflow_provider_synth.triggers.anthropic import AnthropicBatchTrigger  # noqa: E402

KEY = "sk-ant-op-SECRET-777"


class TI(SimpleNamespace):
    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def context() -> dict[str, Any]:
    return {"ti": TI(dag_id="d", task_id="t", run_id="r1", map_index=-1, try_number=1, pushed={})}


@pytest.fixture
def server(batch_server_factory, monkeypatch):
    srv = batch_server_factory(api_key=KEY)
    monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_DEFAULT", json.dumps(
        {"conn_type": "anthropic", "password": KEY, "host": srv.url}))
    return srv


def operator(tmp_path, **kwargs: Any) -> AnthropicBatchOperator:
    kwargs.setdefault("template", RequestTemplate(prompt_template="About {t}", id_field="id"))
    return AnthropicBatchOperator(task_id="t", requests=[{"id": f"r{i}", "t": i} for i in range(3)],
                                  model="claude-haiku-4-5", output_path=str(tmp_path / "out"), poll_interval=0.05,
                                  **kwargs)


def test_defers_with_json_kwargs_and_resumes_per_event_status(tmp_path, server):
    op = operator(tmp_path, deferrable=True)
    with pytest.raises(TaskDeferred) as info:
        op.execute(context())
    trigger = info.value.trigger
    assert isinstance(trigger, AnthropicBatchTrigger) and info.value.method_name == "execute_complete"
    kwargs = trigger.serialize()[1]
    assert kwargs["conn_id"] == "anthropic_default" and len(kwargs["batch_ids"]) == 1 and kwargs["end_time"]
    assert KEY not in json.dumps(kwargs)
    with pytest.raises(TriggerEventError):
        operator(tmp_path, deferrable=True).execute_complete(context(), None)
    with pytest.raises(WaitFailedError, match="re-attaches"):
        operator(tmp_path, deferrable=True).execute_complete(
            context(), {"status": "error", "message": "boom", "batches": {}})
    import asyncio

    async def first_event():
        async for e in trigger.run():
            return e.payload

    event = asyncio.run(first_event())
    manifest = operator(tmp_path, deferrable=True).execute_complete(context(), event)
    assert (manifest["succeeded"], manifest["total"], manifest["backend"]) == (3, 3, "anthropic")
    assert server.counters["message_batches_created"] == 1


def test_over_budget_and_untranslatable_inputs_send_nothing(tmp_path, server):
    with pytest.raises(BudgetExceededError, match="over max_cost_usd"):
        operator(tmp_path, max_cost_usd=1e-9, deferrable=False).execute(context())
    sampled = RequestTemplate(prompt_template="About {t}", id_field="id", params={"temperature": 0.4})
    with pytest.raises(InvalidRequestsError, match="custom_id='r0': temperature cannot be sent"):
        operator(tmp_path / "b", template=sampled, deferrable=False).execute(context())
    assert server.counters["http_requests_total"] == 0
    manifest = operator(tmp_path / "c", template=sampled, deferrable=False,
                        config=AnthropicBatchConfig(sampling="drop")).execute(context())
    assert manifest["translation"]["dropped"] == {"temperature": 3} and manifest["succeeded"] == 3


def test_arguments_are_checked_when_the_dag_is_parsed(tmp_path):
    with pytest.raises(ValueError, match="invalid_requests='skip' is not supported"):
        operator(tmp_path, invalid_requests="skip")
    with pytest.raises(ValueError, match="exactly one of input_path or requests"):
        AnthropicBatchOperator(task_id="t", output_path="x")
