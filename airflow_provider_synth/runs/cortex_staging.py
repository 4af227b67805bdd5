"""The staging tables Cortex runs leave behind (kept after a failure, so that a retry resumes): list them per
run and drop them, touching only tables this provider created, never those of a run that may still be running.

``airflow-synth cortex-staging`` and
:class:`~airflow_provider_synth.operators.cortex.CortexStagingCleanupOperator` drive this module; it holds no
Airflow context.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import redact

from airflow_provider_synth.runs.cortex import SETTLE_S
from airflow_provider_synth.runs.cortex_sql import (
    STAGING_COMMENT,
    TABLE_SUFFIXES,
    StagingTables,
    staging_tables_listing,
)

if TYPE_CHECKING:
    from airflow_provider_synth.hooks.cortex import CortexHook, Statement


DAY_S = 86400.0


def _now() -> float:
    return time.time()


@dataclass
class StagingRun:
    """The staging tables of one run, found by their name and comment.

    :param database: the database they were listed in (``None``: the connection's).
    :param schema: their schema.
    :param prefix: ``<table_prefix>_<key>``.
    :param tables: the table names found (1 to 3).
    :param info: the comment's dag_id, task_id, run_id, map_index, model, created_at.
    """

    database: str | None
    schema: str
    prefix: str
    tables: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def created_at(self) -> float:
        return float(self.info.get("created_at") or 0.0)

    @property
    def staging(self) -> StagingTables:
        return StagingTables(self.database, '"' + self.schema.replace('"', '""') + '"', self.prefix)

    def drop(self) -> list[Statement]:
        """Drop the tables found, and only those: a table of the run's name without this provider's comment
        is not ours."""
        return self.staging.drop([t.rsplit("_", 1)[1] for t in self.tables])

    def as_dict(self) -> dict[str, Any]:
        return {"database": self.database, "schema": self.schema, "prefix": self.prefix, "tables": self.tables,
                **self.info}


def list_staging_runs(hook: CortexHook, *, database: str | None = None, schema: str | None = None,
                      table_prefix: str = "SYNTH_CORTEX", older_than_days: float | None = None) -> list[StagingRun]:
    """The runs whose staging tables are still there: only tables named ``<table_prefix>_<16 hex>_<suffix>``
    AND commented by this provider, optionally only those created more than ``older_than_days`` ago."""
    name = re.compile(re.escape(table_prefix.upper()) + r"_[0-9A-F]{16}_(" + "|".join(TABLE_SUFFIXES) + ")$")
    runs: dict[tuple[str, str], StagingRun] = {}
    for table_schema, table_name, comment in hook.fetch_all(staging_tables_listing(database, schema, table_prefix)):
        if not name.match(str(table_name)) or not str(comment or "").startswith(STAGING_COMMENT):
            continue
        prefix = str(table_name).rsplit("_", 1)[0]
        try:
            info = json.loads(str(comment)[len(STAGING_COMMENT):] or "{}")
        except ValueError:
            info = {}
        run = runs.setdefault((str(table_schema), prefix), StagingRun(database, str(table_schema), prefix))
        run.tables.append(str(table_name))
        run.info = run.info or (info if isinstance(info, dict) else {})
    return split_by_age(list(runs.values()), older_than_days)[0]


def split_by_age(runs: Sequence[StagingRun], older_than_days: float | None) -> tuple[list[StagingRun],
                                                                                      list[StagingRun]]:
    """``(older, recent)``: the runs created more than ``older_than_days`` ago, and the others (``None``: every
    run is old enough)."""
    if older_than_days is None:
        return list(runs), []
    cutoff = _now() - older_than_days * DAY_S
    return [r for r in runs if r.created_at < cutoff], [r for r in runs if r.created_at >= cutoff]


def drop_staging_runs(hook: CortexHook, runs: Sequence[StagingRun], *, dry_run: bool = False) -> dict[str, Any]:
    """Drop the tables of each run, unless one of its statements may still run (then it is kept).

    :returns: ``{"dropped": [prefix...], "kept_running": [prefix...], "errors": [{"prefix", "error"}], "dry_run"}``
    """
    summary: dict[str, Any] = {"dropped": [], "kept_running": [], "errors": [], "dry_run": dry_run}
    for run in runs:
        try:
            if _may_still_run(hook, run):
                summary["kept_running"].append(run.prefix)
                continue
            if not dry_run:
                hook.run_statements(run.drop())
            summary["dropped"].append(run.prefix)
        except Exception as exc:
            summary["errors"].append({"prefix": run.prefix, "error": str(redact(f"{type(exc).__name__}: {exc}"))})
    return summary


def _may_still_run(hook: CortexHook, run: StagingRun) -> bool:
    if f"{run.prefix}_STATEMENTS" not in run.tables:
        return False
    tables = run.staging
    if any(_now() - float(t) < SETTLE_S for _, _, _, t in hook.fetch_all(tables.open_intents())):
        return True
    return any(hook.get_statement_status(str(q)).state == "running"
               for _, q, _ in hook.fetch_all(tables.recorded_statements()))


def staging_report(hook: CortexHook, *, database: str | None = None, schema: str | None = None,
                   table_prefix: str = "SYNTH_CORTEX", older_than_days: float | None = None,
                   prefixes: Sequence[str] = (), drop: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """List the runs whose staging tables are left (``prefixes`` and ``older_than_days`` narrow the list) and,
    with ``drop``, drop them (see :func:`drop_staging_runs`). What ``airflow-synth cortex-staging`` prints, and
    what ``CortexStagingCleanupOperator`` returns.

    :returns: ``{"runs": [...], "not_found": [prefix...], "older_than_days", "kept_recent": [prefix...]}``:
        the runs chosen, the ``prefixes`` with no tables, and the runs left out for being younger than
        ``older_than_days``; with ``drop``, :func:`drop_staging_runs`'s keys too.
    """
    found = list_staging_runs(hook, database=database, schema=schema, table_prefix=table_prefix)
    wanted = {p.upper() for p in prefixes}
    if wanted:
        found = [r for r in found if r.prefix.upper() in wanted]
    not_found = sorted(wanted - {r.prefix.upper() for r in found})
    found, recent = split_by_age(found, older_than_days)
    report: dict[str, Any] = {"runs": [r.as_dict() for r in found], "not_found": not_found,
                              "older_than_days": older_than_days, "kept_recent": [r.prefix for r in recent]}
    if drop:
        report.update(drop_staging_runs(hook, found, dry_run=dry_run))
    return report


def staging_report_text(report: Mapping[str, Any]) -> list[str]:
    """The report of :func:`staging_report` as lines of text."""
    lines = [f"{r['schema']}.{r['prefix']}_*: {len(r['tables'])} table(s), dag {r.get('dag_id')}, task "
             f"{r.get('task_id')}, run {r.get('run_id')}, map_index {r.get('map_index')}, created "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(float(r.get('created_at') or 0)))}"
             for r in report["runs"]]
    lines.append(f"{len(report['runs'])} run(s) with staging tables left")
    lines.extend(f"no staging tables of run {p}" for p in report["not_found"])
    if report.get("kept_recent"):
        lines.append(f"left out {len(report['kept_recent'])} run(s) created less than {report['older_than_days']:g} "
                     "day(s) ago")
    if "dropped" in report:
        verb = "would drop" if report["dry_run"] else "dropped"
        lines.append(f"{verb} the tables of {len(report['dropped'])} run(s)")
        lines.extend(f"kept {p}: a statement of the run may still be running" for p in report["kept_running"])
        lines.extend(f"could not drop {e['prefix']}: {e['error']}" for e in report["errors"])
    return lines
