"""Files and batches of the local Batch API server: in memory, journaled to SQLite, contents on disk.

Memory is what requests read; SQLite is a write-through journal so that a server started again on the
same ``state_dir`` finds its files and batches and resumes the unfinished ones.
"""

from __future__ import annotations

import itertools
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

ACTIVE_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
COMPLETION_WINDOW_S = 24 * 3600


def new_id(prefix: str, length: int = 24) -> str:
    """An id shaped like OpenAI's (``file-...``, ``batch_...``)."""
    return prefix + secrets.token_hex(length // 2)


@dataclass
class FileRecord:
    """One stored file; ``to_api()`` is an OpenAI ``FileObject``."""

    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    seq: int = 0
    expires_at: int | None = None

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }


@dataclass
class BatchRecord:
    """One batch: ``api`` holds the OpenAI ``Batch`` fields, the rest is the server's bookkeeping.

    :param api: the public fields, returned as they are.
    :param processed: input lines already run (the resume point after a restart).
    :param out_bytes: committed size of the work file of successful lines.
    :param err_bytes: committed size of the work file of error lines.
    :param usage: ``[input, cached, output, reasoning]`` tokens so far.
    :param tokens: estimated input tokens, counted against the enqueued-token limit.
    :param expire_after: expire once this many requests were processed.
    :param fail: fail in ``validating``.
    :param first_poll_at: epoch seconds of the first ``GET`` of this batch.
    :param output_expires_s: the output and error files expire this long after they are created
        (``output_expires_after``).
    :param api_kind: ``openai``, or ``anthropic`` for a Message Batch.
    :param message_requests: a Message Batch's number of requests.
    :param result_counts: a Message Batch's ``request_counts`` once it ended.
    """

    api: dict[str, Any]
    seq: int = 0
    processed: int = 0
    out_bytes: int = 0
    err_bytes: int = 0
    usage: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    tokens: int = 0
    expire_after: int | None = None
    fail: bool = False
    first_poll_at: float | None = None
    output_expires_s: int | None = None
    #: ``openai``, or ``anthropic`` for a Message Batch (its requests run as chat lines; see server.anthropic)
    api_kind: str = "openai"
    #: a Message Batch: its requests, and its ``request_counts`` once ended (read from the results once)
    message_requests: int = 0
    result_counts: dict[str, int] | None = None

    @property
    def id(self) -> str:
        return str(self.api["id"])

    @property
    def status(self) -> str:
        return str(self.api["status"])

    def set_status(self, status: str, stamp: str | None = None) -> None:
        """Move to ``status`` and set its timestamp field (``in_progress_at``, ...)."""
        self.api["status"] = status
        if stamp:
            self.api[stamp] = int(time.time())

    def usage_api(self) -> dict[str, Any]:
        inp, cached, out, reasoning = self.usage
        return {
            "input_tokens": inp,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": inp + out,
        }

    @classmethod
    def new(cls, input_file_id: str, endpoint: str, metadata: dict[str, str] | None, model: str | None) -> BatchRecord:
        now = int(time.time())
        api: dict[str, Any] = {
            "id": new_id("batch_", 32),
            "object": "batch",
            "endpoint": endpoint,
            "model": model,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + COMPLETION_WINDOW_S,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
            "usage": None,
        }
        return cls(api=api)


class Store:
    """The server's files and batches.

    :param root: folder holding ``files/``, ``work/`` and ``state.sqlite3``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.work_dir = root / "work"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, FileRecord] = {}
        self.batches: dict[str, BatchRecord] = {}
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(root / "state.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS records (kind TEXT, id TEXT, data BLOB, PRIMARY KEY (kind, id))"
        )
        self._load()

    def _load(self) -> None:
        rows = self._db.execute("SELECT kind, data FROM records").fetchall()
        for kind, data in rows:
            record = orjson.loads(data)
            if kind == "file":
                f = FileRecord(**record)
                self.files[f.id] = f
            else:
                b = BatchRecord(**record)
                self.batches[b.id] = b
        last = max([f.seq for f in self.files.values()] + [b.seq for b in self.batches.values()], default=0)
        self._seq = itertools.count(last + 1)
        self.files = dict(sorted(self.files.items(), key=lambda kv: kv[1].seq))
        self.batches = dict(sorted(self.batches.items(), key=lambda kv: kv[1].seq))

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def work_paths(self, batch_id: str) -> tuple[Path, Path]:
        """The append-only work files of a running batch: successful lines, error lines."""
        return self.work_dir / f"{batch_id}.out", self.work_dir / f"{batch_id}.err"

    def add_file(self, record: FileRecord) -> FileRecord:
        record.seq = next(self._seq)
        self.files[record.id] = record
        self.save_file(record)
        return record

    def save_file(self, record: FileRecord) -> None:
        self._put("file", record.id, asdict(record))

    def delete_file(self, file_id: str) -> FileRecord | None:
        """Delete a file; the content of an input file that a running batch still reads is kept until it ends."""
        record = self.files.pop(file_id, None)
        if record is not None:
            with self._lock:
                self._db.execute("DELETE FROM records WHERE kind = 'file' AND id = ?", (file_id,))
            if any(b.api["input_file_id"] == file_id and b.status in ACTIVE_STATUSES for b in self.batches.values()):
                self.file_path(file_id).replace(self.kept_input_path(file_id))
            else:
                self.file_path(file_id).unlink(missing_ok=True)
        return record

    def purge_expired_files(self, now: float | None = None) -> list[str]:
        """Delete the files whose ``expires_at`` has passed, as the service does; returns their ids."""
        now = time.time() if now is None else now
        gone = [f.id for f in list(self.files.values()) if f.expires_at is not None and f.expires_at <= now]
        for file_id in gone:
            self.delete_file(file_id)
        return gone

    def kept_input_path(self, file_id: str) -> Path:
        return self.work_dir / f"{file_id}.input"

    def input_path(self, batch: BatchRecord) -> Path:
        """The input file of a batch, also after the file was deleted while the batch ran."""
        path = self.file_path(batch.api["input_file_id"])
        return path if path.exists() else self.kept_input_path(batch.api["input_file_id"])

    def release_input(self, batch: BatchRecord) -> None:
        """Drop a kept input file once no running batch reads it."""
        file_id = batch.api["input_file_id"]
        if not any(b.api["input_file_id"] == file_id and b.status in ACTIVE_STATUSES for b in self.batches.values()):
            self.kept_input_path(file_id).unlink(missing_ok=True)

    def add_batch(self, record: BatchRecord) -> BatchRecord:
        record.seq = next(self._seq)
        self.batches[record.id] = record
        self.save_batch(record)
        return record

    def delete_batch(self, batch_id: str) -> None:
        """Forget an ended batch (its output files stay until deleted)."""
        if self.batches.pop(batch_id, None) is not None:
            with self._lock:
                self._db.execute("DELETE FROM records WHERE kind = 'batch' AND id = ?", (batch_id,))

    def save_batch(self, record: BatchRecord) -> None:
        self._put("batch", record.id, asdict(record))

    def _put(self, kind: str, record_id: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO records (kind, id, data) VALUES (?, ?, ?)",
                (kind, record_id, orjson.dumps(data)),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
