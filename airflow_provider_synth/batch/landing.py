"""Where paid answers become files: every download and every merged output lands whole, or not at all.

* On a local disk a file is written under a temporary name in its own folder (``.<name>.partial-<hex>``),
  flushed to disk, checked, and renamed onto its name: a worker killed mid-way leaves the temporary file (removed
  by the next landing of the same name), never a half file under the real name.
* On object storage (S3, GCS, Azure Blob) an object is published only when its upload completes: it is written
  under its own name, the upload discarded on any error, and the object checked after it landed (its size).
* ``expected_bytes`` (what the service says the file holds: the Files API ``bytes``) is checked before the
  rename and after the upload; a file that does not match is not kept.

Errors of the store itself (disk full, permission denied, an outage) become :class:`StorageError`, naming the
path and what to do; nothing that failed looks finished, so a later try lands the file again.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any

from airflow_provider_synth.batch.errors import BatchCoreError
from airflow_provider_synth.batch.paths import file_size, local_path, open_path

PARTIAL = ".partial-"

_HINTS = {
    errno.ENOSPC: "the disk or volume is full: free space (or give the task a larger volume) and retry the task",
    errno.EDQUOT: "the disk quota is exhausted: free space and retry the task",
    errno.EACCES: "permission denied: give the worker's user (or the connection's credentials) write access, then "
                  "retry the task",
    errno.EPERM: "operation not permitted: check the folder's permissions (or the bucket policy), then retry",
    errno.EROFS: "the filesystem is read-only: point output_path at a writable location",
}


class StorageError(BatchCoreError, OSError):
    """Writing or reading the output or work folder failed (disk full, permission denied, a storage outage).

    Nothing was claimed as done: a later try (once the cause is gone) lands the file again without paying again.
    """


class IncompleteFileError(StorageError):
    """A file landed with another size than the service said it holds (a download cut short)."""


def storage_error(exc: BaseException, path: Any, action: str = "writing") -> StorageError:
    """A :class:`StorageError` naming ``path``, the cause, and what to check."""
    if isinstance(exc, StorageError):
        return exc
    code = getattr(exc, "errno", None)
    hint = _HINTS.get(code) if isinstance(code, int) else None
    if hint is None and isinstance(exc, PermissionError):
        hint = _HINTS[errno.EACCES]
    hint = hint or ("the storage did not answer or refused the request: check that it is reachable and that the "
                    "connection's credentials are right, then retry the task (what was paid for is re-attached, "
                    "never paid again)")
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    error = StorageError(f"{action} {path} failed: {detail} ({type(exc).__name__}); {hint}")
    error.errno = code if isinstance(code, int) else None
    return error


class _Counted:
    """A write-only file object that counts the bytes written and names the path in its errors."""

    def __init__(self, fp: IO[bytes], path: Any) -> None:
        self._fp, self._path, self.written = fp, path, 0

    def write(self, data: bytes) -> int:
        try:
            self._fp.write(data)
        except OSError as exc:
            raise storage_error(exc, self._path) from exc
        self.written += len(data)
        return len(data)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._fp.flush()


def _check(path: Any, size: int, expected: int | None) -> None:
    if expected is not None and size != expected:
        raise IncompleteFileError(f"{path}: {size} bytes landed where the service holds {expected}; it was not kept, "
                                  "and the next try fetches it again")


def _remove_partials(target: Any, keep: str | None = None) -> None:
    prefix = f".{target.name}{PARTIAL}"
    with suppress(OSError):
        for entry in os.scandir(target.parent):
            if entry.name.startswith(prefix) and entry.name != keep:
                with suppress(OSError):
                    os.unlink(entry.path)


@contextmanager
def landing(dest: Any, *, expected_bytes: int | None = None) -> Iterator[IO[bytes]]:
    """Write ``dest`` whole or not at all (see the module); yields a binary file object to write to.

    :param dest: a local path, URL or ObjectStoragePath.
    :param expected_bytes: the size the file must have (what the service says it holds); ``None``: any.
    :raises StorageError: the store refused or failed (the message names the path and what to check).
    :raises IncompleteFileError: the file's size is not ``expected_bytes``.
    """
    target = local_path(dest)
    if target is not None:
        with _landing_local(target, expected_bytes) as fp:
            yield fp
        return
    try:
        raw = open_path(dest, "wb")
    except OSError as exc:
        raise storage_error(exc, dest) from exc
    out = _Counted(raw, dest)
    try:
        yield out  # type: ignore[misc]
        _check(dest, out.written, expected_bytes)  # before the upload completes: a short file is never published
        raw.close()
    except BaseException as exc:
        _discard(raw)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, dest) from exc
        raise
    if expected_bytes is not None:
        _check(dest, file_size(dest), expected_bytes)


@contextmanager
def _landing_local(target: Any, expected_bytes: int | None) -> Iterator[IO[bytes]]:
    tmp = target.with_name(f".{target.name}{PARTIAL}{uuid.uuid4().hex[:12]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fp = open(tmp, "wb")  # noqa: SIM115 - closed below, on every path
    except OSError as exc:
        raise storage_error(exc, target) from exc
    out = _Counted(fp, target)
    try:
        try:
            yield out  # type: ignore[misc]
            fp.flush()
            os.fsync(fp.fileno())
        finally:
            fp.close()
        _check(target, out.written, expected_bytes)
        os.replace(tmp, target)
    except BaseException as exc:
        with suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, target) from exc
        raise
    _remove_partials(target)  # what killed tries left behind


def _discard(fp: Any) -> None:
    """Abandon an object-storage upload: never completed, so never published (s3fs aborts its multipart
    upload); a file object without ``discard`` is closed as it is."""
    discard = getattr(fp, "discard", None)
    with suppress(Exception):
        if discard is not None:
            discard()
            fp.closed = True  # fsspec's buffered files complete the upload when closed (or collected)
        else:
            fp.close()


def landed(path: Any, expected_bytes: int | None = None) -> bool:
    """Whether ``path`` holds a whole file: it exists and, when ``expected_bytes`` is known, has that size. A
    file of another size (a download a crash cut short, with a writer that was not atomic) is not landed."""
    try:
        size = file_size(path)
    except (FileNotFoundError, OSError):
        return False
    return expected_bytes is None or size == expected_bytes
