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
