"""Operator extra link to the batches' page in the provider's dashboard (OpenAI platform or Azure AI Foundry).

The operator persists the URL in XCom *before* deferring (:meth:`OpenAIBatchLink.persist`), so the link works
while the task waits; Airflow 3's API server reads it back from XCom under :attr:`OpenAIBatchLink.xcom_key`.
A connection whose base URL is not OpenAI's (the local Batch API server, a gateway, a self-hosted server) has no
dashboard: the link is empty, and Airflow's UI hides an empty link.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from airflow.providers.common.compat.sdk import BaseOperatorLink, XCom

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey

OPENAI_BATCHES_URL = "https://platform.openai.com/batches"
AZURE_FOUNDRY_URL = "https://ai.azure.com"
#: The operator attribute that holds the link this process persisted ("" before any): read in the worker
#: instead of XCom, where a link never pushed would log "XCom not found" as an error on every early failure.
PERSISTED_LINK_ATTR = "_synth_dashboard_url"


def has_openai_dashboard(base_url: str | None) -> bool:
    """Whether batches made through ``base_url`` show on platform.openai.com (OpenAI's own API hosts)."""
    if not base_url:
        return True
    host = (urlsplit(base_url if "://" in base_url else f"https://{base_url}").hostname or "").lower()
    return host == "openai.com" or host.endswith(".openai.com")


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


def batches_url(
    batch_ids: Sequence[str], *, azure: bool = False, resource_id: str | None = None, base_url: str | None = None
) -> str:
    """The page of the only batch, or the dashboard's batch list when there are several; ``""`` when the
    connection's ``base_url`` is not OpenAI's (no dashboard to link to)."""
    if not azure and not has_openai_dashboard(base_url):
        return ""
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
        base_url: str | None = None,
    ) -> str:
        """Store the link for this task instance (call before deferring) and return it.

        :param context: the task's context.
        :param batch_ids: the task's batches.
        :param azure: Azure OpenAI batches.
        :param resource_id: Azure only: the ARM id of the resource (connection extra ``resource_id``).
        :param base_url: the client's base URL; the link is empty unless it is OpenAI's.
        """
        url = batches_url(batch_ids, azure=azure, resource_id=resource_id, base_url=base_url)
        context["ti"].xcom_push(key=cls().xcom_key, value=url)
        task = context.get("task")
        if task is not None:
            setattr(task, PERSISTED_LINK_ATTR, url)
        return url

    @staticmethod
    def start(operator: BaseOperator) -> None:
        """Mark that ``operator`` starts a try with no link yet (call at the top of ``execute``, never in a
        method resumed after deferral, whose link an earlier process of the same try may have persisted)."""
        setattr(operator, PERSISTED_LINK_ATTR, "")

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        # The worker asks for the link when the task ends: this process already knows it (or that there is
        # none); elsewhere (the API server, a resumed task) it comes from XCom.
        known = getattr(operator, PERSISTED_LINK_ATTR, None)
        if isinstance(known, str):
            return known
        value: Any = XCom.get_value(ti_key=ti_key, key=self.xcom_key)
        return str(value) if value else ""
