"""Paths, the one way: a local path, an fsspec URL (``s3://``, ``memory://``...) or an ObjectStoragePath/UPath.

Every layer opens, joins and tests files through these, so the task that submits and the task that downloads
may run on different machines and the same code serves local folders and object storage.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
from functools import cache
from pathlib import Path
from typing import IO, Any

#: Object-storage schemes whose filesystem comes from an extra: the extra, and the modules it installs
#: (Airflow's ObjectStoragePath takes s3:// from the Amazon provider, gs:// from the Google one, each on fsspec).
STORAGE_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "s3": ("s3", ("airflow.providers.amazon", "s3fs")),
    "s3a": ("s3", ("airflow.providers.amazon", "s3fs")),
    "gs": ("gcs", ("airflow.providers.google", "gcsfs")),
    "gcs": ("gcs", ("airflow.providers.google", "gcsfs")),
}


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


def as_path(path: Any) -> Any:
    """Object-storage URLs become ``ObjectStoragePath`` (connection-aware) where Airflow is installed; local
    paths (and ``file://`` URLs) become plain strings; path objects are kept.

    :param path: what a user or a stored plan gave.
    """
    if isinstance(path, str) and path.startswith("file://"):
        return path[len("file://"):]
    if isinstance(path, str) and "://" in path:
        try:
            from airflow.sdk import ObjectStoragePath
        except ImportError:  # the vLLM engine's interpreter has no Airflow: fsspec reads the URL itself
            return path
        check_storage(path)
        return ObjectStoragePath(path)
    return path


def open_path(path: Any, mode: str = "rb") -> IO[bytes]:
    """Open a local path, an fsspec URL or an ObjectStoragePath/UPath.

    Writing creates parent folders on filesystems that have them.
    """
    writing = "w" in mode or "a" in mode
    if not isinstance(path, str) and hasattr(path, "protocol") and hasattr(path, "open"):
        # ObjectStoragePath / UPath: keep the object, it carries the connection's storage options
        if writing:
            path.parent.mkdir(parents=True, exist_ok=True)
        fobj: IO[bytes] = path.open(mode)
        return fobj
    path = os.fspath(path)
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
