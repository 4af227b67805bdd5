"""The output folder every operator writes: ``results.jsonl``, ``failures.jsonl``, ``manifest.json``.

The manifest holds counts, batch or query ids, usage, cost, paths and the try number; the same dict is the
task's XCom. It never holds request or result rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from airflow_provider_synth.batch.jsonl import loads
from airflow_provider_synth.batch.landing import landing
from airflow_provider_synth.batch.paths import join_path, open_path

RESULTS_FILE = "results.jsonl"
FAILURES_FILE = "failures.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


def output_paths(output_dir: Any) -> dict[str, Any]:
    """The three files of an output folder."""
    return {"results_path": join_path(output_dir, RESULTS_FILE),
            "failures_path": join_path(output_dir, FAILURES_FILE),
            "manifest_path": join_path(output_dir, MANIFEST_FILE)}


def build_manifest(*, backend: str, accounting: Mapping[str, Any], output_dir: Any, **extra: Any) -> dict[str, Any]:
    """A manifest dict: backend, counts from the accounting, the output paths (as strings) and ``extra``
    (batch_ids, usage, cost_usd, try_number, dag_id, task_id, run_id, map_index...)."""
    paths = {k: str(v) for k, v in output_paths(output_dir).items()}
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "backend": backend,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "output_dir": str(output_dir),
        **paths,
    }
    manifest.update(accounting)
    manifest.update(extra)
    return manifest


def write_manifest(output_dir: Any, manifest: Mapping[str, Any]) -> str:
    """Write ``manifest.json`` into ``output_dir``; return its path as a string."""
    path = join_path(output_dir, MANIFEST_FILE)
    with landing(path) as fp:
        fp.write(orjson.dumps(dict(manifest), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return str(path)


def read_manifest(output_dir_or_file: Any) -> dict[str, Any]:
    """Read a manifest from its folder or its file."""
    path = output_dir_or_file
    if not str(path).endswith(".json"):
        path = join_path(path, MANIFEST_FILE)
    with open_path(path, "rb") as fp:
        data: dict[str, Any] = loads(fp.read())
    return data
