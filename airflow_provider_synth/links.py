"""Operator extra link to the batches' page in the provider's dashboard (OpenAI platform or Azure AI Foundry).

The operator persists the URL in XCom *before* deferring (:meth:`OpenAIBatchLink.persist`), so the link works
while the task waits; Airflow 3's API server reads it back from XCom under :attr:`OpenAIBatchLink.xcom_key`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.providers.common.compat.sdk import XCom
from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey

OPENAI_BATCHES_URL = "https://platform.openai.com/batches"
AZURE_FOUNDRY_URL = "https://ai.azure.com"


def batch_url(batch_id: str, *, azure: bool = False, resource_id: str | None = None) -> str:
    """The dashboard page of one batch.

    :param batch_id: the batch id.
    :param azure: an Azure OpenAI batch (Azure AI Foundry) rather than an OpenAI one.
    :param resource_id: Azure only: the ARM id of the Azure OpenAI resource
        (``/subscriptions/.../providers/Microsoft.CognitiveServices/accounts/<name>``), which Foundry needs
        to open the resource; without it the link opens Foundry's batch job list.
    """
    if not azure:
        return f"{OPENAI_BATCHES_URL}/{quote(batch_id, safe='')}"
    if not resource_id:
        return f"{AZURE_FOUNDRY_URL}/resource/batchjobs"
    return f"{AZURE_FOUNDRY_URL}/resource/batchjob/{quote(batch_id, safe='')}?wsid={quote(resource_id, safe='/')}"


def batches_url(batch_ids: Sequence[str], *, azure: bool = False, resource_id: str | None = None) -> str:
    """The page of the only batch, or the dashboard's batch list when there are several."""
    if len(batch_ids) == 1:
        return batch_url(batch_ids[0], azure=azure, resource_id=resource_id)
    if not azure:
        return OPENAI_BATCHES_URL
    suffix = f"?wsid={quote(resource_id, safe='/')}" if resource_id else ""
    return f"{AZURE_FOUNDRY_URL}/resource/batchjobs{suffix}"


class OpenAIBatchLink(BaseOperatorLink):
    """"Batch dashboard": the OpenAI (or Azure AI Foundry) page of the task's batch, or of its batch list."""

    name = "Batch dashboard"

    @property
    def xcom_key(self) -> str:
        return "_link_OpenAIBatchLink"

    @classmethod
    def persist(
        cls,
        context: Context,
        batch_ids: Sequence[str],
        *,
        azure: bool = False,
        resource_id: str | None = None,
    ) -> str:
        """Store the link for this task instance (call before deferring) and return it.

        :param context: the task's context.
        :param batch_ids: the task's batches.
        :param azure: Azure OpenAI batches.
        :param resource_id: Azure only: the ARM id of the resource (connection extra ``resource_id``).
        """
        url = batches_url(batch_ids, azure=azure, resource_id=resource_id)
        context["ti"].xcom_push(key=cls().xcom_key, value=url)
        return url

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        value: Any = XCom.get_value(ti_key=ti_key, key=self.xcom_key)
        return str(value) if value else ""
