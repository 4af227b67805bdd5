from __future__ import annotations

import pytest
from airflow.sdk import BaseOperator

from airflow_provider_synth.links import OpenAIBatchLink, batch_url, batches_url

RESOURCE = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/acc"


@pytest.mark.parametrize(
    ("ids", "kwargs", "expected"),
    [
        (["batch_1"], {}, "https://platform.openai.com/batches/batch_1"),
        (["b1", "b2"], {}, "https://platform.openai.com/batches"),
        (["batch_1"], {"azure": True}, "https://ai.azure.com/resource/batchjobs"),
        (["batch_1"], {"azure": True, "resource_id": RESOURCE},
         f"https://ai.azure.com/resource/batchjob/batch_1?wsid={RESOURCE}"),
        (["b1", "b2"], {"azure": True, "resource_id": RESOURCE},
         f"https://ai.azure.com/resource/batchjobs?wsid={RESOURCE}"),
    ],
)
def test_urls(ids, kwargs, expected):
    assert batches_url(ids, **kwargs) == expected


def test_batch_id_is_quoted():
    assert batch_url("a/b?c") == "https://platform.openai.com/batches/a%2Fb%3Fc"


def test_persist_pushes_the_url_under_the_link_key():
    pushed = {}

    class FakeTI:
        def xcom_push(self, key, value):
            pushed[key] = value

    url = OpenAIBatchLink.persist({"ti": FakeTI()}, ["batch_9"])
    assert url == "https://platform.openai.com/batches/batch_9"
    assert pushed == {"_link_OpenAIBatchLink": url}


def test_link_survives_dag_serialization():
    """The API server rebuilds links from the serialized DAG and reads the URL from XCom by key."""
    from airflow.serialization.serialized_objects import OperatorSerialization

    class WithLink(BaseOperator):
        operator_extra_links = (OpenAIBatchLink(),)

    op = WithLink(task_id="submit")
    data = OperatorSerialization.serialize_operator(op)
    restored = OperatorSerialization.deserialize_operator(data)
    link = restored.operator_extra_link_dict["Batch dashboard"]
    assert link.xcom_key == "_link_OpenAIBatchLink"


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        (None, "https://platform.openai.com/batches/b1"),
        ("https://api.openai.com/v1/", "https://platform.openai.com/batches/b1"),
        ("https://eu.api.openai.com/v1", "https://platform.openai.com/batches/b1"),
        ("api.openai.com/v1", "https://platform.openai.com/batches/b1"),
        ("http://127.0.0.1:8787/v1", ""),
        ("https://llm-gateway.example.com/openai/v1", ""),
        ("https://openai.com.evil.example/v1", ""),
    ],
)
def test_link_follows_the_connection_base_url(base_url, expected):
    assert batches_url(["b1"], base_url=base_url) == expected


def test_azure_link_ignores_the_base_url():
    url = batches_url(["b1"], azure=True, base_url="https://acc.openai.azure.com/")
    assert url == "https://ai.azure.com/resource/batchjobs"


class _NoXCom:
    def __init__(self):
        self.asked = []

    def get_value(self, *, ti_key, key):
        self.asked.append(key)
        return "https://platform.openai.com/batches/from-xcom"


def test_worker_side_link_comes_from_the_operator_not_xcom(monkeypatch):
    """Airflow asks for the link as the task ends: a task that failed before submitting has none, and asking
    XCom for it would log "XCom not found" as an error."""
    import airflow_provider_synth.links as links

    xcom = _NoXCom()
    monkeypatch.setattr(links, "XCom", xcom)
    op = BaseOperator(task_id="t")
    OpenAIBatchLink.start(op)
    assert OpenAIBatchLink().get_link(op, ti_key=object()) == ""
    pushed = {}

    class FakeTI:
        def xcom_push(self, key, value):
            pushed[key] = value

    OpenAIBatchLink.persist({"ti": FakeTI(), "task": op}, ["b7"])
    assert OpenAIBatchLink().get_link(op, ti_key=object()) == "https://platform.openai.com/batches/b7"
    assert xcom.asked == []
    # a task resumed after deferral (a fresh operator object) reads what the first part of the try persisted
    assert OpenAIBatchLink().get_link(BaseOperator(task_id="t"), ti_key=object()).endswith("/from-xcom")
    assert xcom.asked == ["_link_OpenAIBatchLink"]
