"""One output folder, one writer per DAG run: a task instance claims its folder before it writes anything there.

Mapped task instances (``.expand()``) share their operator's arguments: an ``output_path`` without
``{{ ti.map_index }}`` sends every map index to the same folder, where each overwrites the others'
``results.jsonl``, ``failures.jsonl``, ``manifest.json`` and work files; every map index succeeds, and only the
last one's results survive. Two tasks of a DAG run given the same folder do the same. So each task instance
first writes a claim, ``_claims/<run key>/<task_id>.<map_index>.json`` (the run key hashes the dag_id and the
run_id), then lists the claims of its DAG run: one by another task instance is a conflict, found before
anything is uploaded, staged or run.

Write, then list: of two task instances claiming at the same moment, at most one passes (each sees the other's
claim unless it listed before the other wrote, and then the other one sees it); at worst both fail. This needs
a store whose listing shows a finished write at once: local disks, S3, GCS and Azure Blob Storage are strongly
consistent.

A retry of the same task instance rewrites its own claim. Other DAG runs claim under their own run key, so a
run that reuses a folder an earlier run wrote is not refused (the user chose to overwrite it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from airflow_provider_synth.batch.jsonl import dumps, loads
from airflow_provider_synth.batch.keys import dag_run_key
from airflow_provider_synth.batch.paths import join_path, list_names, open_path

#: where the claims live, inside the output folder
CLAIMS_DIR = "_claims"


@dataclass(frozen=True)
class Claim:
    """The task instance writing an output folder.

    :param dag_id: the DAG.
    :param task_id: the task.
    :param run_id: the DAG run.
    :param map_index: the map index (-1 when the task is not mapped).
    :param try_number: the try that claimed (a retry claims again).
    :param hostname: the worker that claimed.
    :param claimed_at: when (ISO 8601).
    """

    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int = 1
    hostname: str = ""
    claimed_at: str = ""

    @property
    def file_name(self) -> str:
        """The claim's file: one per task instance of a DAG run."""
        return f"{self.task_id}.{self.map_index}.json"

    def same_run(self, other: Claim) -> bool:
        return (self.dag_id, self.run_id) == (other.dag_id, other.run_id)

    def same_task_instance(self, other: Claim) -> bool:
        return self.same_run(other) and (self.task_id, self.map_index) == (other.task_id, other.map_index)

    @property
    def label(self) -> str:
        return f"task_id={self.task_id} map_index={self.map_index}"

    def __str__(self) -> str:
        where = ", ".join(x for x in (f"try {self.try_number}", self.hostname and f"on {self.hostname}",
                                      self.claimed_at and f"at {self.claimed_at}") if x)
        return f"{self.label} ({where})"


def run_key(dag_id: str, run_id: str) -> str:
    """A DAG run's folder name under ``_claims`` (run ids hold characters some stores refuse, such as ``:``)."""
    return dag_run_key(dag_id, run_id)


def claims_folder(output_dir: Any, dag_id: str, run_id: str) -> Any:
    """Where the claims of one DAG run on ``output_dir`` live."""
    return join_path(join_path(output_dir, CLAIMS_DIR), run_key(dag_id, run_id))


def claim_output(output_dir: Any, claim: Claim) -> list[Claim]:
    """Claim ``output_dir`` for one task instance: write its claim, then list its DAG run's claims.

    :param output_dir: the output folder (local path, URL or ObjectStoragePath).
    :param claim: the task instance claiming.
    :return: the claims of the other task instances of the same DAG run on this folder (a conflict when any).
    """
    folder = claims_folder(output_dir, claim.dag_id, claim.run_id)
    with open_path(join_path(folder, claim.file_name), "wb") as fp:
        fp.write(dumps(asdict(claim)))
    others = [_read_claim(folder, name, claim) for name in list_names(folder)
              if name.endswith(".json") and name != claim.file_name]
    return [o for o in others if o.same_run(claim) and not o.same_task_instance(claim)]


def _read_claim(folder: Any, name: str, mine: Claim) -> Claim:
    try:
        with open_path(join_path(folder, name), "rb") as fp:
            return Claim(**loads(fp.read()))
    except (OSError, ValueError, TypeError):  # still being written, or damaged: its name says who it is
        task_id, _, index = name.removesuffix(".json").rpartition(".")
        return Claim(mine.dag_id, task_id or name, mine.run_id, int(index) if index.lstrip("-").isdigit() else -1)


def conflict_message(output_dir: Any, claim: Claim, others: Sequence[Claim]) -> str:
    """Why a task instance may not write ``output_dir``, and how to fix the DAG."""
    holders = "; ".join(str(o) for o in others)
    return (
        f"output_path {output_dir} is already claimed by another task instance of DAG {claim.dag_id!r}, run "
        f"{claim.run_id!r}: {holders}. This task instance ({claim.label}) would overwrite its results.jsonl, "
        "failures.jsonl, manifest.json and work files, and only the last writer's results would survive; it "
        "stops here, before anything is submitted. Give every task instance its own output folder: put "
        "{{ ti.map_index }} (and the run id, {{ run_id }}) in output_path, e.g. "
        "output_path=\".../{{ dag.dag_id }}/{{ run_id }}/{{ ti.map_index }}\", and give different tasks "
        f"different folders. The claims are in {claims_folder(output_dir, claim.dag_id, claim.run_id)}."
    )
