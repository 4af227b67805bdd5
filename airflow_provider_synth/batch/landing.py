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

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any

from airflow_provider_synth.batch.errors import IncompleteFileError, StorageError
from airflow_provider_synth.batch.paths import file_size, local_path, open_path, storage_error

__all__ = ["IncompleteFileError", "StorageError", "landed", "landing", "storage_error"]

PARTIAL = ".partial-"


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


def read_record(path: Any, default: Any = None) -> Any:
    """A run's JSON record (its batches, rounds' estimates, findings) from ``path``; ``default`` where there is
    none yet (or the store cannot be read: the record is written again by the step that needs it)."""
    import orjson

    try:
        with open_path(path, "rb") as fp:
            return orjson.loads(fp.read())
    except (FileNotFoundError, OSError):
        return default


def write_record(path: Any, data: Any) -> None:
    """Write a run's JSON record to ``path``, whole or not at all (:func:`landing`)."""
    import orjson

    with landing(path) as fp:
        fp.write(orjson.dumps(data))
