"""The output-folder claim: write, then list, on local folders and object storage (fsspec's memory://)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import fsspec
import orjson
import pytest
from upath import UPath

from airflow_provider_synth.batch.claims import Claim, claim_output, claims_folder, conflict_message, run_key
from airflow_provider_synth.batch.paths import list_names


def ti(task_id: str = "quiz", map_index: int = -1, run_id: str = "manual__2026-01-01T00:00:00+00:00",
       dag_id: str = "d", try_number: int = 1) -> Claim:
    return Claim(dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index, try_number=try_number,
                 hostname="worker-1", claimed_at="2026-01-01T00:00:01+00:00")


@pytest.fixture(params=["local", "memory-url", "memory-upath"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        return str(tmp_path / "out")
    url = f"memory://synth-claims-{uuid.uuid4().hex}/out"
    return url if request.param == "memory-url" else UPath(url)


def test_the_first_claim_passes_and_is_written_where_documented(folder: Any) -> None:
    mine = ti(map_index=0)
    assert claim_output(folder, mine) == []
    where = claims_folder(folder, mine.dag_id, mine.run_id)
    assert str(where).endswith(f"/_claims/{run_key(mine.dag_id, mine.run_id)}")
    assert list_names(where) == ["quiz.0.json"]
    with fsspec.open(str(where).rstrip("/") + "/quiz.0.json", "rb") as fp:
        assert orjson.loads(fp.read()) == {"dag_id": "d", "task_id": "quiz", "run_id": mine.run_id, "map_index": 0,
                                           "try_number": 1, "hostname": "worker-1",
                                           "claimed_at": "2026-01-01T00:00:01+00:00"}


def test_another_map_index_of_the_same_run_conflicts_and_both_claims_are_kept(folder: Any) -> None:
    assert claim_output(folder, ti(map_index=0)) == []
    assert claim_output(folder, ti(map_index=1)) == [ti(map_index=0)]
    # the first one, claiming again (a retry of map index 0), now sees map index 1 as well: nobody passes twice
    assert claim_output(folder, ti(map_index=0, try_number=2)) == [ti(map_index=1)]


def test_another_task_of_the_same_run_conflicts(folder: Any) -> None:
    assert claim_output(folder, ti("generate")) == []
    assert [c.task_id for c in claim_output(folder, ti("judge"))] == ["generate"]


def test_a_retry_of_the_same_task_instance_passes(folder: Any) -> None:
    assert claim_output(folder, ti(map_index=3)) == []
    assert claim_output(folder, ti(map_index=3, try_number=2)) == []
    assert list_names(claims_folder(folder, "d", ti().run_id)) == ["quiz.3.json"]


def test_other_dag_runs_and_other_dags_do_not_conflict(folder: Any) -> None:
    assert claim_output(folder, ti(map_index=0, run_id="scheduled__1")) == []
    assert claim_output(folder, ti(map_index=1, run_id="scheduled__2")) == []  # reusing a folder: the user's choice
    assert claim_output(folder, ti(map_index=1, dag_id="other", run_id="scheduled__1")) == []


def test_a_claim_being_written_still_counts_by_its_name(folder: Any) -> None:
    mine = ti(map_index=1)
    where = claims_folder(folder, mine.dag_id, mine.run_id)
    with fsspec.open(str(where).rstrip("/") + "/quiz.0.json", "wb", auto_mkdir=True) as fp:
        fp.write(b'{"dag_id": "d", "task')  # another worker's claim, half written
    (other,) = claim_output(folder, mine)
    assert (other.task_id, other.map_index, other.run_id) == ("quiz", 0, mine.run_id)


def test_at_most_one_of_two_racing_claims_passes(tmp_path: Path) -> None:
    """Both write before either lists: both fail (never both pass)."""
    folder = str(tmp_path / "out")
    a, b = ti(map_index=0), ti(map_index=1)
    where = claims_folder(folder, a.dag_id, a.run_id)
    Path(where).mkdir(parents=True)
    (Path(where) / b.file_name).write_bytes(orjson.dumps(b.__dict__))  # b wrote, has not listed yet
    assert claim_output(folder, a) == [b]
    assert claim_output(folder, b) == [a]


def test_the_message_names_both_task_instances_and_the_fix() -> None:
    mine, other = ti(map_index=1), ti(map_index=0)
    message = conflict_message("s3://bucket/out", mine, [other])
    assert "task_id=quiz map_index=0 (try 1, on worker-1, at 2026-01-01T00:00:01+00:00)" in message
    assert "This task instance (task_id=quiz map_index=1) would overwrite" in message
    assert "{{ ti.map_index }}" in message and "{{ run_id }}" in message and "before anything is submitted" in message
    assert f"s3://bucket/out/_claims/{run_key('d', mine.run_id)}" in message


def test_list_names_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert list_names(str(tmp_path / "nope")) == []
    assert list_names(tmp_path / "nope") == []
    assert list_names(f"memory://synth-claims-{uuid.uuid4().hex}/nope") == []
