"""Files of a vLLM run: the engine's working copies and resume state, and merging shards' output folders.

No Airflow imports: the operator in :mod:`airflow_provider_synth.operators.vllm` drives these.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_provider_synth.batch.checks import sum_checks
from airflow_provider_synth.batch.errors import AccountingError
from airflow_provider_synth.batch.jsonl import dumps, loads
from airflow_provider_synth.batch.landing import landing
from airflow_provider_synth.batch.manifest import build_manifest, output_paths, read_manifest, write_manifest
from airflow_provider_synth.batch.merge import MAX_EXAMPLES
from airflow_provider_synth.batch.paths import exists, file_size, join_path, local_path, open_path
from airflow_provider_synth.batch.usage import Usage, total_cost

#: The engine's own state inside the output folder: its raw output lines (the resume state) and a stamp of
#: the input they answer.
STATE_DIR = "_vllm"
ENGINE_OUTPUT = "engine-output.jsonl"
STATE_FILE = "state.json"
#: The shards' manifest counts that add up into the combined manifest's.
_SUMMED = ("total", "succeeded", "failed", "missing", "retryable", "duplicates", "unknown", "invalid",
           "synthetic_ids")


def merge_output_folders(folders: Sequence[Any], output_path: Any, **extra: Any) -> dict[str, Any]:
    """Concatenate the output folders of shards (each already merged and checked, in input order) into one
    output folder, and write its manifest. Use it after ``.expand()``-ing an operator over shards.

    :param folders: the shards' output folders, in shard order.
    :param output_path: the combined output folder.
    :param extra: more manifest keys (dag_id, run_id, ...).
    :returns: the combined manifest.
    """
    usage = Usage()
    counts = dict.fromkeys(_SUMMED, 0)
    error_codes: Counter[str] = Counter()
    examples: dict[str, list[str]] = {"unknown_examples": [], "duplicate_examples": []}
    costs: list[float | None] = []
    batch_ids: list[str] = []
    checks: list[dict[str, Any]] = []
    paths = output_paths(output_path)
    with landing(paths["results_path"]) as results, landing(paths["failures_path"]) as failures:
        for folder in folders:
            shard = read_manifest(folder)
            for key in counts:
                counts[key] += int(shard.get(key) or 0)
            error_codes.update(shard.get("error_codes") or {})
            for key, kept in examples.items():
                kept += (shard.get(key) or [])[:MAX_EXAMPLES - len(kept)]
            costs.append(None if shard.get("cost_usd") is None else float(shard["cost_usd"]))
            usage.add(Usage.from_dict(shard.get("usage") or {}))
            batch_ids.extend(shard.get("batch_ids") or [])
            checks += [shard["checks"]] if shard.get("checks") else []
            _copy_into(shard["results_path"], results)
            _copy_into(shard["failures_path"], failures)
    if counts["succeeded"] + counts["failed"] + counts["missing"] != counts["total"]:
        raise AccountingError(f"the shards' manifests do not add up: {counts}")
    accounting: dict[str, Any] = {**counts, **examples, "error_codes": dict(error_codes), "usage": usage.as_dict(),
                                  "cost_usd": total_cost(costs)}
    if checks:
        accounting["checks"] = sum_checks(checks)
    manifest = build_manifest(backend=extra.pop("backend", "vllm"), accounting=accounting,
                              output_dir=output_path, batch_ids=batch_ids, shards=len(folders),
                              shard_output_paths=[str(f) for f in folders], **extra)
    write_manifest(output_path, manifest)
    return manifest


def _copy_into(src: Any, fout: Any) -> None:
    with open_path(src, "rb") as fin:
        shutil.copyfileobj(fin, fout, 1 << 20)


@dataclass
class EngineWorkspace:
    """Where the engine reads and writes. Local output folders are used in place; remote ones (s3://...) get
    a local working copy of the input and of the engine's answers, uploaded at checkpoints and at the end."""

    scratch: Path
    local_input: Path
    local_output: Path
    remote_output: Any
    remote_state: Any
    remote: bool

    @classmethod
    def create(cls, input_path: Any, output_path: Any, scratch: Path) -> EngineWorkspace:
        state_dir = join_path(output_path, STATE_DIR)
        remote_output = join_path(state_dir, ENGINE_OUTPUT)
        remote = local_path(output_path) is None
        local_input = local_path(input_path)
        if local_input is None:
            local_input = scratch / "input.jsonl"
            _copy(input_path, local_input)
        local_output = scratch / ENGINE_OUTPUT if remote else Path(local_path(remote_output) or "")
        return cls(scratch, local_input, local_output, remote_output, join_path(state_dir, STATE_FILE), remote)

    def restore_state(self, fingerprint: str, log: Any) -> None:
        """Keep the saved answers if they answer this very input, model and sampling; else start afresh."""
        saved = _read_json(self.remote_state)
        if (saved or {}).get("fingerprint") != fingerprint and exists(self.remote_output):
            log.warning("The saved vLLM answers in %s were not made for this input, model and sampling: "
                        "starting afresh", self.remote_output)
            with open_path(self.remote_output, "wb"):
                pass
        if self.remote and exists(self.remote_output):
            _copy(self.remote_output, self.local_output)
        self.local_output.parent.mkdir(parents=True, exist_ok=True)
        with landing(self.remote_state) as fp:
            fp.write(dumps({"fingerprint": fingerprint}))

    def checkpoint(self) -> None:
        """Upload the complete lines of the local answers (a remote output folder only)."""
        if not self.remote or not self.local_output.exists():
            return
        data = self.local_output.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        with landing(self.remote_output, expected_bytes=len(whole)) as fp:  # written, then checked
            fp.write(whole)


def _copy(src: Any, dst: Any) -> None:
    """Copy a file whole (checked against the source's size) or not at all."""
    with open_path(src, "rb") as fin, landing(dst, expected_bytes=file_size(src)) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _read_json(path: Any) -> dict[str, Any] | None:
    try:
        with open_path(path, "rb") as fp:
            data = loads(fp.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
