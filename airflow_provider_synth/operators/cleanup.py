"""Delete old files this provider left on an OpenAI or Azure OpenAI account, and nothing else: the operator.

The logic (what is ours, what is in use, the deletes) is :func:`~airflow_provider_synth.runs.cleanup.clean_up_batch_files`,
which the ``airflow-synth cleanup`` command calls too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator

from airflow_provider_synth.exceptions import SynthError
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.runs.cleanup import clean_up_batch_files

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context


class OpenAIBatchCleanupOperator(BaseOperator):
    """Delete the files this provider left on an OpenAI or Azure OpenAI account, older than N days.

    Deletes only the inputs it uploaded (named ``synth-<run key>-s<shard>-r<round>.jsonl``) and the output and
    error files of the batches it created (``metadata.created_by``); never other files of the account, and
    never a file a running batch uses. Returns a summary: counts, bytes, the deleted ids. Fails (after
    deleting what it could) when some files could not be deleted.

    Choose ``older_than_days`` longer than your longest run, retries included: a run's outputs are downloaded
    when it finishes, and a retried task re-attaches to files younger than that.

    .. seealso:: :ref:`howto/operator:OpenAIBatchCleanupOperator`

    :param conn_id: a ``synth_openai``, ``synth_azure_openai`` or ``openai`` connection.
    :param older_than_days: delete files created more than this many days ago.
    :param dry_run: log and return what would be deleted, delete nothing.
    """

    template_fields: Sequence[str] = ("conn_id",)
    ui_color = "#f0e6d7"

    def __init__(
        self,
        *,
        older_than_days: float,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(older_than_days, bool) or not isinstance(older_than_days, int | float) \
                or older_than_days < 0:
            raise ValueError(f"older_than_days must be a number >= 0, got {older_than_days!r}")
        # not ``self.dry_run``: that name is BaseOperator's method
        self.conn_id, self.older_than_days, self.is_dry_run = conn_id, float(older_than_days), dry_run

    @property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(self.conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        summary = clean_up_batch_files(self.hook, self.older_than_days, dry_run=self.is_dry_run, logger=self.log)
        self.log.info(
            "%s %d file(s), %d bytes (%d uploads, %d outputs); kept %d recent and %d in use by running batches",
            "would delete" if self.is_dry_run else "deleted", summary.deleted, summary.bytes, summary.uploads,
            summary.outputs, summary.kept_recent, summary.kept_running)
        if summary.errors:
            first = "; ".join(f"{e['file_id']}: {e['error']}" for e in summary.errors[:5])
            raise SynthError(f"could not delete {len(summary.errors)} file(s) ({first}); "
                             f"{summary.deleted} other(s) were deleted. Run again to retry.")
        return summary.as_dict()
