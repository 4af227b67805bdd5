"""Delete old files this provider left on an OpenAI or Azure OpenAI account, and nothing else.

Every batch run uploads its shards (``synth-<key>-s<shard>-r<round>.jsonl``) and its batches leave output and
error files behind; the Files API keeps them until someone deletes them. The seeds' clean-up deletes every
file of the account older than N days, other teams' included. This one deletes only:

* files this provider uploaded: purpose ``batch`` and a name of exactly our shape (prefix, run key, shard,
  round), and
* the output and error files of finished batches this provider created (``metadata.created_by``),

older than N days, and never a file a still-running batch (anybody's) reads or writes. The Batch API cannot
delete batches themselves: their records stay, without files.

:func:`clean_up_batch_files` holds the logic; the
:class:`~airflow_provider_synth.operators.cleanup.OpenAIBatchCleanupOperator` and the ``airflow-synth cleanup``
command both call it. No Airflow context here.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import redact

from airflow_provider_synth.batch.status import TERMINAL_STATUSES
from airflow_provider_synth.hooks.openai import OpenAIBatchHook
from airflow_provider_synth.runs.openai import CREATED_BY, CREATED_BY_META, KEY_META, UPLOAD_PREFIX

if TYPE_CHECKING:
    from openai.types import Batch, FileObject

log = logging.getLogger(__name__)

#: the name of every file :class:`~airflow_provider_synth.runs.openai.BatchRun` uploads
UPLOAD_NAME = re.compile(rf"^{re.escape(UPLOAD_PREFIX)}[0-9a-f]{{32}}-s\d{{5,}}-r\d+\.jsonl$")
#: at most this many file ids in a summary (it is a task's XCom); the counts stay exact
MAX_LISTED_IDS = 1000
DAY_S = 86400.0
#: delete calls in flight at once
DELETE_CONCURRENCY = 8


def is_our_upload(file: FileObject) -> bool:
    """Whether this provider uploaded ``file``: batch input named ``synth-<key>-s<shard>-r<round>.jsonl``."""
    return file.purpose == "batch" and bool(UPLOAD_NAME.match(file.filename or ""))


def is_our_batch(batch: Batch) -> bool:
    """Whether this provider created ``batch`` (its metadata says so)."""
    return (batch.metadata or {}).get(CREATED_BY_META) == CREATED_BY


@dataclass
class CleanupSummary:
    """What a clean-up deleted (or, in a dry run, would delete) and what it kept.

    :param dry_run: nothing was deleted; ``deleted`` counts what would have been.
    :param older_than_days: the age limit.
    :param cutoff: files created before this moment (epoch seconds) were candidates.
    :param deleted: files deleted.
    :param bytes: their total size.
    :param uploads: how many of them were our uploaded inputs.
    :param outputs: how many were output or error files of our batches.
    :param file_ids: their ids (at most :data:`MAX_LISTED_IDS`).
    :param kept_recent: our files kept because they are younger than the limit.
    :param kept_running: our files kept because a running batch uses them.
    :param errors: ``{"file_id", "error"}`` for each file that could not be deleted.
    """

    dry_run: bool
    older_than_days: float
    cutoff: float
    deleted: int = 0
    bytes: int = 0
    uploads: int = 0
    outputs: int = 0
    file_ids: list[str] = field(default_factory=list)
    kept_recent: int = 0
    kept_running: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)

    def add(self, file: FileObject, kind: str) -> None:
        self.deleted += 1
        self.bytes += int(file.bytes or 0)
        if kind == "upload":
            self.uploads += 1
        else:
            self.outputs += 1
        if len(self.file_ids) < MAX_LISTED_IDS:
            self.file_ids.append(file.id)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the operator's XCom, the CLI's ``--json`` output)."""
        return {
            "dry_run": self.dry_run,
            "older_than_days": self.older_than_days,
            "cutoff": datetime.fromtimestamp(self.cutoff, UTC).isoformat(timespec="seconds"),
            "deleted": self.deleted,
            "bytes": self.bytes,
            "uploads": self.uploads,
            "outputs": self.outputs,
            "file_ids": list(self.file_ids),
            "file_ids_truncated": self.deleted > len(self.file_ids),
            "kept_recent": self.kept_recent,
            "kept_running": self.kept_running,
            "errors": list(self.errors),
        }


def _scan_batches(batches: Iterable[Batch], run_key: str | None = None) -> tuple[set[str], set[str]]:
    """Split the account's batches into the files still in use and the outputs of our finished batches (of
    the run ``run_key`` only, when given)."""
    in_use: set[str] = set()
    our_outputs: set[str] = set()
    for batch in batches:
        ids = {batch.input_file_id, batch.output_file_id, batch.error_file_id} - {None, ""}
        if batch.status not in TERMINAL_STATUSES:
            in_use |= ids  # type: ignore[arg-type]
        elif is_our_batch(batch) and (run_key is None or (batch.metadata or {}).get(KEY_META) == run_key):
            our_outputs |= {batch.output_file_id, batch.error_file_id} - {None, ""}  # type: ignore[arg-type]
    return in_use, our_outputs


def _delete(hook: OpenAIBatchHook, file_id: str) -> str | None:
    """Delete one file; return the error, if any. A file already gone is not an error (another clean-up got
    there first) but is not counted as deleted either: ``"gone"``."""
    import openai

    try:
        hook.delete_file(file_id)
    except openai.NotFoundError:
        return "gone"
    except openai.OpenAIError as exc:
        return str(redact(f"{type(exc).__name__}: {exc}"))
    return None


def clean_up_batch_files(
    hook: OpenAIBatchHook,
    older_than_days: float,
    *,
    dry_run: bool = False,
    now: float | None = None,
    logger: Any = None,
    concurrency: int = DELETE_CONCURRENCY,
    run_key: str | None = None,
) -> CleanupSummary:
    """Delete this provider's files older than ``older_than_days`` (see the module docstring for which).

    Lists every batch first (to know which files running batches use, and which are outputs of ours), then
    every file, then deletes the chosen ones, ``concurrency`` calls at a time. Errors deleting one file are
    collected in the summary and the clean-up goes on.

    :param hook: the hook of the account's connection.
    :param older_than_days: delete files created more than this many days ago (fractions allowed).
    :param dry_run: list what would be deleted, delete nothing.
    :param now: the current time in epoch seconds (tests); default: now.
    :param logger: a ``logging.Logger``-like object to log each file to (default: this module's logger).
    :param concurrency: delete calls in flight at once (the sync client is thread-safe).
    :param run_key: only the files of this run (its key: the manifest's ``idempotency_key``).
    :return: the counts, bytes and ids.
    """
    if older_than_days < 0:
        raise ValueError(f"older_than_days must be >= 0, got {older_than_days}")
    logger = logger or log
    now = time.time() if now is None else now
    summary = CleanupSummary(dry_run=dry_run, older_than_days=older_than_days, cutoff=now - older_than_days * DAY_S)
    in_use, our_outputs = _scan_batches(hook.list_batches(), run_key)
    upload_prefix = f"{UPLOAD_PREFIX}{run_key}-" if run_key else UPLOAD_PREFIX
    chosen: list[tuple[FileObject, str]] = []
    for file in hook.list_files():
        ours = is_our_upload(file) and (file.filename or "").startswith(upload_prefix)
        kind = "upload" if ours else "output" if file.id in our_outputs else None
        if kind is None:
            continue  # not ours: never touched
        if file.id in in_use:
            summary.kept_running += 1
        elif file.created_at >= summary.cutoff:
            summary.kept_recent += 1
        else:
            chosen.append((file, kind))
    if dry_run:
        outcomes: Iterable[str | None] = [None] * len(chosen)
    else:
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="synth-cleanup")
        with pool:
            outcomes = list(pool.map(lambda c: _delete(hook, c[0].id), chosen))
    verb = "would delete" if dry_run else "deleted"
    for (file, kind), error in zip(chosen, outcomes, strict=True):
        if error is None:
            summary.add(file, kind)
            logger.info("%s %s file %s (%s, %d bytes, %.1f days old)", verb, kind, file.id, file.filename,
                        file.bytes or 0, (now - file.created_at) / DAY_S)
        elif error != "gone":
            summary.errors.append({"file_id": file.id, "error": error})
    return summary
