"""Paths, the one way: a local path, an fsspec URL (``s3://``, ``memory://``...) or an ObjectStoragePath/UPath.

Every layer opens, joins and tests files through these, so the task that submits and the task that downloads
may run on different machines and the same code serves local folders and object storage.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import posixpath
from functools import cache
from pathlib import Path
from typing import IO, Any

from airflow_provider_synth.batch.errors import StorageError

#: Object-storage schemes whose filesystem comes from an extra: the extra, and the modules it installs
#: (Airflow's ObjectStoragePath takes s3:// from the Amazon provider, gs:// from the Google one, each on fsspec).
STORAGE_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "s3": ("s3", ("airflow.providers.amazon", "s3fs")),
    "s3a": ("s3", ("airflow.providers.amazon", "s3fs")),
    "gs": ("gcs", ("airflow.providers.google", "gcsfs")),
    "gcs": ("gcs", ("airflow.providers.google", "gcsfs")),
}


_HINTS = {
    errno.ENOSPC: "the disk or volume is full: free space (or give the task a larger volume) and retry the task",
    errno.EDQUOT: "the disk quota is exhausted: free space and retry the task",
    errno.EACCES: "permission denied: give the worker's user (or the connection's credentials) write access, then "
                  "retry the task",
    errno.EPERM: "operation not permitted: check the folder's permissions (or the bucket policy), then retry",
    errno.EROFS: "the filesystem is read-only: point output_path at a writable location",
}


def storage_error(exc: BaseException, path: Any, action: str = "writing") -> StorageError:
    """A :class:`~airflow_provider_synth.batch.errors.StorageError` naming ``path``, the cause, and what to
    check (a full disk, a permission, an unreachable store)."""
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


@cache
def _missing_modules(modules: tuple[str, ...]) -> tuple[str, ...]:
    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ModuleNotFoundError:  # a parent package is missing
            return True

    return tuple(m for m in modules if missing(m))


def check_storage(url: str) -> None:
    """Fail early, naming the extra to install, when ``url``'s filesystem is not installed.

    :raises ImportError: e.g. ``pip install 'airflow-provider-synth[s3]'`` for an ``s3://`` URL without it.
    """
    scheme = url.split("://", 1)[0].lower()
    extra, modules = STORAGE_EXTRAS.get(scheme, ("", ()))
    missing = _missing_modules(modules)
    if missing:
        raise ImportError(f"{url}: {scheme}:// paths need {' and '.join(missing)}, which are not installed: "
                          f"pip install 'airflow-provider-synth[{extra}]'")


#: The connection a scheme's paths use when none is named (``s3://bucket/key``), as Airflow users expect and the
#: providers' hooks default to; the environment's credentials only where that connection does not exist.
DEFAULT_CONN_IDS: dict[str, str] = {
    "s3": "aws_default", "s3a": "aws_default", "s3n": "aws_default",
    "gs": "google_cloud_default", "gcs": "google_cloud_default",
}


def _connection_exists(conn_id: str) -> bool:
    try:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:
        return False
    try:
        BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return False
    return True


def default_conn_id(scheme: str) -> str | None:
    """The connection paths of ``scheme`` use when they name none: the scheme's default connection
    (``aws_default`` for ``s3://``, ``google_cloud_default`` for ``gs://``) when it is defined, else ``None``
    (the filesystem's own credential chain: environment, instance profile...)."""
    conn_id = DEFAULT_CONN_IDS.get(scheme.lower())
    return conn_id if conn_id is not None and _connection_exists(conn_id) else None


def _split_conn(url: str) -> tuple[str, str | None, str]:
    """``s3://conn@bucket/key`` -> ``("s3", "conn", "s3://bucket/key")``; no connection named: ``None``."""
    scheme, _, rest = url.partition("://")
    netloc, sep, tail = rest.partition("/")
    if "@" in netloc:
        conn_id, _, bucket = netloc.rpartition("@")
        return scheme, conn_id or None, f"{scheme}://{bucket}{sep}{tail}"
    return scheme, None, url


def _through_connection(url: str) -> bool:
    """Whether a URL string opens through an Airflow connection: a scheme with a default connection, or one
    naming its connection (``scheme://conn@...``). Other schemes (``memory://``) go to fsspec as they are."""
    scheme, sep, rest = url.partition("://")
    return bool(sep) and (scheme.lower() in DEFAULT_CONN_IDS or "@" in rest.partition("/")[0])


def as_path(path: Any) -> Any:
    """Object-storage URLs become ``ObjectStoragePath`` with their connection where Airflow is installed; local
    paths (and ``file://`` URLs) become plain strings; other path objects are kept.

    ``s3://conn_id@bucket/key`` uses the connection ``conn_id``, as Airflow's ``ObjectStoragePath`` defines it;
    ``s3://bucket/key`` (and an ``ObjectStoragePath`` made without ``conn_id``) uses the scheme's default
    connection (:func:`default_conn_id`). ``str()`` of the result names its connection, so a stored path string
    (the plan's work folder, a manifest's paths) opens through the same connection on any worker.

    :param path: what a user or a stored plan gave.
    """
    if isinstance(path, str) and path.startswith("file://"):
        return path[len("file://"):]
    if isinstance(path, str) and "://" in path:
        try:
            from airflow.sdk import ObjectStoragePath
            from airflow.sdk.io import has_fs
        except ImportError:  # the vLLM engine's interpreter has no Airflow: fsspec reads the URL itself
            return path
        check_storage(path)
        if not _through_connection(path) and not has_fs(path.partition("://")[0]):
            return path  # a filesystem Airflow has no store for (memory://...): fsspec opens it
        scheme, conn_id, bare = _split_conn(path)
        conn_id = conn_id or default_conn_id(scheme)
        return ObjectStoragePath(bare, conn_id=conn_id) if conn_id else ObjectStoragePath(path)
    if type(path).__name__ == "ObjectStoragePath" and getattr(path, "conn_id", "") is None:
        protocol = path.protocol[0] if isinstance(path.protocol, tuple | list) else path.protocol
        conn_id = default_conn_id(str(protocol))
        if conn_id:
            return type(path)(str(path), conn_id=conn_id)
    return path


def path_url(path: Any) -> str:
    """The string to store for a path (plan, manifest, claims): an object-storage URL names its connection
    (``s3://aws_default@bucket/key``), so :func:`as_path` reopens it through the same connection."""
    return str(as_path(path)) if isinstance(path, str) else str(path)


def open_path(path: Any, mode: str = "rb") -> IO[bytes]:
    """Open a local path, an fsspec URL or an ObjectStoragePath/UPath.

    Writing creates parent folders on filesystems that have them.
    """
    writing = "w" in mode or "a" in mode
    if not isinstance(path, str) and hasattr(path, "protocol") and hasattr(path, "open"):
        # ObjectStoragePath / UPath: keep the object, it carries the connection's storage options
        try:
            if writing:
                path.parent.mkdir(parents=True, exist_ok=True)
            fobj: IO[bytes] = path.open(mode)
        except FileNotFoundError:
            raise
        except Exception as exc:  # the store's own errors (botocore, google-api-core...) name no path
            raise storage_error(exc, path, "writing" if writing else "reading") from exc
        return fobj
    path = os.fspath(path)
    if _through_connection(path):
        located = as_path(path)
        if not isinstance(located, str):
            return open_path(located, mode)
    if "://" not in path:
        if writing:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, mode)  # noqa: SIM115 - the caller owns the file object
    import fsspec

    opened: IO[bytes] = fsspec.open(path, mode, auto_mkdir=True).open()
    return opened


def join_path(base: Any, name: str) -> Any:
    """Join a file name onto a folder given as a local path, a URL string or a path object."""
    if isinstance(base, str):
        return base.rstrip("/") + "/" + name
    return base / name


def _filesystem(location: Any) -> tuple[Any, str]:
    """The fsspec filesystem and path of a remote location: a URL, or a path object (ObjectStoragePath, UPath)."""
    if isinstance(location, str):
        located = as_path(location) if _through_connection(location) else location
        if not isinstance(located, str):
            return located.fs, located.path
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return fs, path
    return location.fs, location.path


def exists(path: Any) -> bool:
    """Whether a file exists, wherever it lives."""
    local = local_path(path)
    if local is not None:
        return local.exists()
    if isinstance(path, str):
        fs, p = _filesystem(path)
        return bool(fs.exists(p))
    return bool(path.exists())


def file_size(path: Any) -> int:
    """The size of a file in bytes, wherever it lives (a remote listing is read afresh).

    :raises FileNotFoundError: there is no such file.
    """
    local = local_path(path)
    if local is not None:
        return local.stat().st_size
    fs, p = _filesystem(path)
    fs.invalidate_cache(p)
    return int(fs.info(p)["size"])


def list_names(folder: Any) -> list[str]:
    """The names of the entries of a folder, wherever it lives, sorted; none when the folder does not exist.

    Listed afresh: a filesystem's cached listing (s3fs, gcsfs) is dropped first, so that what another worker
    wrote a moment ago is seen.
    """
    local = local_path(folder)
    if local is not None:
        try:
            return sorted(os.listdir(local))
        except FileNotFoundError:
            return []
    fs, path = _filesystem(folder)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)


def local_path(path: Any) -> Path | None:
    """The local filesystem path of ``path``, or ``None`` when it lives in object storage."""
    protocol = getattr(path, "protocol", None)
    if protocol is not None:
        protocol = protocol[0] if isinstance(protocol, tuple | list) else protocol
        return Path(str(getattr(path, "path", path))) if protocol in ("file", "local", "") else None
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None if "://" in text else Path(text)
