"""What every batch operator tells Airflow about its output folder: whose it is, and what landed in it.

Two mixins, shared by the OpenAI/Azure, Cortex and vLLM operators (and their TaskFlow decorators).

:class:`OutputClaimMixin`: the operator calls :meth:`~OutputClaimMixin.claim_output` first thing in ``execute``,
so that a task instance never writes a folder another task instance of its DAG run writes
(:mod:`airflow_provider_synth.batch.claims`).

:class:`ManifestPublisherMixin`: the operator calls :meth:`~ManifestPublisherMixin.publish_manifest` right after
writing ``manifest.json``; from that one dict come

* the **asset event**: every :class:`~airflow.sdk.Asset` in the task's ``outlets`` gets an event whose
  ``extra`` holds the run's counts, tokens, cost and output paths (Airflow records it when the task succeeds);
* the **metrics**: ``synth.<backend>.*`` counters through Airflow's ``Stats`` (see docs/metrics.md);
* the **lineage**: :meth:`~ManifestPublisherMixin.get_openlineage_facets_on_complete`, read by the
  OpenLineage provider when it is installed (it is optional: nothing here imports it at module level).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_provider_synth.batch.claims import Claim, claim_output, conflict_message
from airflow_provider_synth.exceptions import OutputFolderClaimedError
from airflow_provider_synth.runs.base import RunIdentity

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk import BaseOperator, Context

    _Base = BaseOperator
else:
    _Base = object

#: manifest keys copied into an asset event's ``extra`` (small and JSON-only: never rows)
EXTRA_KEYS = ("backend", "model", "total", "succeeded", "failed", "missing", "cost_usd", "output_dir",
              "results_path", "failures_path", "manifest_path", "run_id", "dag_id", "task_id", "map_index")
#: the usage keys that become token counters
TOKEN_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens")


def asset_extra(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extra`` of the asset event a run emits: counts, tokens, cost and where the output lies."""
    extra = {k: manifest[k] for k in EXTRA_KEYS if k in manifest}
    usage = manifest.get("usage") or {}
    extra["usage"] = {k: int(usage.get(k) or 0) for k in TOKEN_KEYS}
    return extra


def metric_counts(manifest: Mapping[str, Any]) -> dict[str, int]:
    """The counters one finished run adds (name suffix -> count). Cost is counted in micro-dollars, since
    counters are integers."""
    usage = manifest.get("usage") or {}
    counts = {
        "requests": int(manifest.get("total") or 0),
        "requests.succeeded": int(manifest.get("succeeded") or 0),
        "requests.failed": int(manifest.get("failed") or 0) + int(manifest.get("missing") or 0),
        "tokens.input": int(usage.get("prompt_tokens") or 0),
        "tokens.output": int(usage.get("completion_tokens") or 0),
        "tokens.cached": int(usage.get("cached_tokens") or 0),
    }
    cost = manifest.get("cost_usd")
    if cost is not None:
        counts["cost_microusd"] = round(float(cost) * 1_000_000)
    checks = manifest.get("checks") or {}
    extra = {f"answers.{kind}": int(checks.get(kind) or 0)  # unusable answers the output checks refused
             for kind in ("truncated", "refused", "schema_invalid")}
    extra["requests.direct"] = int(manifest.get("direct_requests") or 0)
    counts.update({name: n for name, n in extra.items() if n})
    return counts


def emit_metrics(manifest: Mapping[str, Any]) -> None:
    """Add one run's counts to ``synth.<backend>.<counter>``, tagged with dag_id, task_id and model."""
    from airflow.providers.common.compat.sdk import Stats

    backend = str(manifest.get("backend") or "unknown")
    tags = {k: str(manifest[k]) for k in ("dag_id", "task_id", "model") if manifest.get(k) is not None}
    for name, count in metric_counts(manifest).items():
        if count:
            Stats.incr(f"synth.{backend}.{name}", count, tags=tags)


def snowflake_table_dataset(conn_id: str, table: str) -> tuple[str, str]:
    """OpenLineage ``(namespace, name)`` of a Snowflake table: ``snowflake://<account>`` and
    ``DATABASE.SCHEMA.TABLE`` (missing parts from the connection), as the snowflake provider names them."""
    from airflow.providers.snowflake.hooks.snowflake import SnowflakeHook

    hook = SnowflakeHook(snowflake_conn_id=conn_id)
    info = hook.get_openlineage_database_info(hook.get_connection(conn_id))
    parts = [p.strip('"') for p in table.split(".")]
    defaults = [str(info.database or ""), str(hook.get_openlineage_default_schema() or "")]
    parts = [*defaults[: 3 - len(parts)], *parts] if len(parts) < 3 else parts
    return f"{info.scheme}://{info.authority}", ".".join(p.upper() for p in parts if p)


def lineage_dataset(path: Any) -> tuple[str, str]:
    """OpenLineage ``(namespace, name)`` of a file or folder: ``s3://bucket`` + key, ``file`` + local path."""
    text = str(path)
    if "://" not in text:
        return "file", os.path.abspath(text)
    parts = urlsplit(text)
    if parts.scheme == "file":
        return "file", parts.path
    return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/") or "/"


def _exists(path: str) -> bool:
    from airflow_provider_synth.batch.paths import as_path

    found = as_path(path)
    return bool(found.exists()) if not isinstance(found, str) else os.path.exists(found)


@functools.cache
def _run_facet_class() -> type[Any]:
    """The ``synthBatch`` run facet, built on first use so that the OpenLineage client stays optional."""
    from attrs import define
    from openlineage.client.facet_v2 import RunFacet

    @define
    class SynthBatchRunFacet(RunFacet):
        """One batch run's outcome: backend, model, counts, token usage and cost (USD, None when unpriced)."""

        backend: str
        model: str | None
        total: int
        succeeded: int
        failed: int
        missing: int
        usage: dict[str, int]
        costUsd: float | None
        batchIds: list[str]

        @staticmethod
        def _get_schema() -> str:
            return "https://github.com/airflow-provider-synth/airflow-provider-synth/blob/main/docs/native.md#lineage"

    return SynthBatchRunFacet


def run_facet(manifest: Mapping[str, Any]) -> Any:
    """The ``synthBatch`` run facet of a manifest."""
    usage = manifest.get("usage") or {}
    return _run_facet_class()(
        backend=str(manifest.get("backend")), model=manifest.get("model"),
        total=int(manifest.get("total") or 0), succeeded=int(manifest.get("succeeded") or 0),
        failed=int(manifest.get("failed") or 0), missing=int(manifest.get("missing") or 0),
        usage={k: int(usage.get(k) or 0) for k in TOKEN_KEYS}, costUsd=manifest.get("cost_usd"),
        batchIds=[str(b) for b in (manifest.get("batch_ids") or manifest.get("query_ids") or [])],
    )


class OutputClaimMixin(_Base):
    """Claims the output folder for the running task instance before anything is written into it.

    Call :meth:`claim_output` at the very start of ``execute`` (a TaskFlow decorator that writes into the folder
    before the operator's ``execute`` calls it first; the second call is then a no-op). Not in
    ``execute_complete``: a resumed task instance holds its claim already. Override :meth:`output_folder` where
    the operator writes its folder through another path form.
    """

    _claimed: tuple[Any, ...] | None = None

    def output_folder(self) -> Any:
        """The output folder, as the operator writes it (``None``: nothing to claim)."""
        return getattr(self, "output_path", None)

    def claim_output(self, context: Context) -> None:
        """Claim :meth:`output_folder` for this task instance; skipped when the context has no task instance.

        :raises OutputFolderClaimedError: another task instance of this DAG run claimed the folder; nothing was
            written or submitted.
        """
        ti = context.get("ti")
        folder = self.output_folder()
        if ti is None or folder is None:
            return
        who = RunIdentity.from_ti(ti)  # the same identity run keys and manifests use
        claim = Claim(dag_id=who.dag_id, task_id=who.task_id, run_id=who.run_id, map_index=who.map_index,
                      try_number=who.try_number,
                      hostname=str(getattr(ti, "hostname", None) or socket.gethostname()),
                      claimed_at=datetime.now(UTC).isoformat(timespec="seconds"))
        # the same operator object may run several task instances (dag.test()): remember whose claim this was
        key = (claim.dag_id, claim.task_id, claim.run_id, claim.map_index, claim.try_number, str(folder))
        if self._claimed == key:
            return
        others = claim_output(folder, claim)
        if others:
            raise OutputFolderClaimedError(conflict_message(folder, claim, others))
        self._claimed = key


class ManifestPublisherMixin(_Base):
    """Asset event, metrics and OpenLineage facets from the manifest a batch operator wrote.

    Put it before ``BaseOperator`` in the bases; call :meth:`publish_manifest` once the manifest is written.
    Override :meth:`lineage_inputs` where the input is not ``input_path``.
    """

    _published_manifest: dict[str, Any] | None = None

    def publish_manifest(self, context: Context, manifest: Mapping[str, Any]) -> None:
        """Record a finished run: metrics now, the asset event's extra (sent if the task succeeds), and the
        manifest for lineage. Never fails the task: a metrics backend down is logged, not raised."""
        self._published_manifest = dict(manifest)
        try:
            emit_metrics(manifest)
        except Exception as exc:  # metrics are best effort; the run's outcome is in the manifest
            self.log.warning("could not emit synth metrics: %s", exc)
        self._set_asset_events(context, manifest)

    def _set_asset_events(self, context: Context, manifest: Mapping[str, Any]) -> None:
        from airflow.sdk import Asset

        assets = [o for o in (self.outlets or []) if isinstance(o, Asset)]
        if not assets:
            return
        extra = asset_extra(manifest)
        events = context["outlet_events"]
        for asset in assets:
            events[asset].extra.update(extra)
        self.log.info("asset event(s) for %s: %d succeeded of %d, cost $%s", [a.name for a in assets],
                      extra.get("succeeded", 0), extra.get("total", 0), extra.get("cost_usd"))

    # -- lineage ----------------------------------------------------------------------------------------------

    def lineage_inputs(self, manifest: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        """The run's inputs as OpenLineage ``(namespace, name)`` pairs: the Cortex ``source_table``, else
        ``input_path``, else the request file the operator built from records in its work folder."""
        table = getattr(self, "source_table", None)
        if table is not None:
            yield snowflake_table_dataset(getattr(self, "snowflake_conn_id", "snowflake_default"), table.table)
            return
        path = getattr(self, "input_path", None)
        if path is None and manifest.get("work_dir"):
            built = f"{str(manifest['work_dir']).rstrip('/')}/requests.jsonl"
            path = built if _exists(built) else None  # a collecting task of a run given an input file: unknown
        if path is not None:
            yield lineage_dataset(path)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage[Any, Any]:
        """Inputs (request file or table), the output folder, and a ``synthBatch`` run facet with counts,
        tokens, cost and model. Called by the OpenLineage provider after the task succeeded."""
        from airflow.providers.common.compat.openlineage.facet import InputDataset, OutputDataset
        from airflow.providers.openlineage.extractors import OperatorLineage

        manifest = self._published_manifest
        if manifest is None:  # nothing finished in this try (submit-only task, or a failure before the merge)
            return OperatorLineage()
        inputs = [InputDataset(namespace=ns, name=name) for ns, name in self.lineage_inputs(manifest)]
        ns, name = lineage_dataset(manifest["output_dir"])
        return OperatorLineage(inputs=inputs, outputs=[OutputDataset(namespace=ns, name=name)],
                               run_facets={"synthBatch": run_facet(manifest)})

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> OperatorLineage[Any, Any]:
        """The same facets when a run wrote its manifest and then failed (too many failed requests)."""
        return self.get_openlineage_facets_on_complete(task_instance)
