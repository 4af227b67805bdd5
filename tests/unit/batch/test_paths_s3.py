"""Object storage through Airflow connections, on a real S3 API (moto's server on 127.0.0.1).

``s3://conn_id@bucket/key`` uses ``conn_id`` as Airflow's ObjectStoragePath defines it; ``s3://bucket/key`` uses
``aws_default``; every path string the run keeps names its connection, so it reopens through it anywhere.
"""

from __future__ import annotations

import json

import pytest

from airflow_provider_synth.batch.claims import Claim, claim_output
from airflow_provider_synth.batch.paths import as_path, exists, join_path, list_names, open_path, path_url


@pytest.mark.parametrize("conn", [True, False], ids=["conn-in-url", "default-conn"])
def test_read_write_list_through_the_connection(s3_bucket, conn) -> None:
    url = s3_bucket.url("run/out", conn=conn)
    target = join_path(as_path(url), "results.jsonl")
    with open_path(target, "wb") as fp:
        fp.write(b'{"a":1}\n')
    assert s3_bucket.read("run/out/results.jsonl") == b'{"a":1}\n'
    assert exists(target) and list_names(url) == ["results.jsonl"]
    # strings work the same as path objects (the plan keeps strings)
    with open_path(url + "/results.jsonl", "rb") as fp:
        assert fp.read() == b'{"a":1}\n'
    assert exists(url + "/results.jsonl") and not exists(url + "/nope.jsonl")


def test_stored_path_strings_name_their_connection(s3_bucket) -> None:
    stored = path_url(s3_bucket.url("run/_work", conn=False))
    assert stored == f"s3://aws_default@{s3_bucket.bucket}/run/_work"
    # a string joined onto the stored one, then opened (what the plan's work_dir goes through)
    with open_path(stored + "/plan.json", "wb") as fp:
        fp.write(b"{}")
    assert s3_bucket.keys("run/") == ["run/_work/plan.json"]
    assert as_path(stored).conn_id == "aws_default"


def test_a_named_connection_is_used_and_aws_default_is_not_needed(s3_bucket, monkeypatch) -> None:
    monkeypatch.setenv(*s3_bucket.connection_env("lake"))
    monkeypatch.delenv("AIRFLOW_CONN_AWS_DEFAULT")
    url = f"s3://lake@{s3_bucket.bucket}/x/a.txt"
    with open_path(url, "wb") as fp:
        fp.write(b"hi")
    assert s3_bucket.read("x/a.txt") == b"hi"
    assert path_url(url) == url


def test_without_the_default_connection_the_environment_is_used(s3_bucket, monkeypatch) -> None:
    """No ``aws_default``: the filesystem's own credential chain (here the environment) is the fallback."""
    monkeypatch.delenv("AIRFLOW_CONN_AWS_DEFAULT")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = s3_bucket.url("env/a.txt", conn=False)
    assert path_url(url) == url  # no connection to name
    with open_path(url, "wb") as fp:
        fp.write(b"env")
    assert s3_bucket.read("env/a.txt") == b"env"


def test_claims_on_s3_through_the_connection(s3_bucket) -> None:
    out = as_path(s3_bucket.url("runs/1/out", conn=False))
    mine = Claim("d", "t", "r1", 0)
    assert claim_output(out, mine) == []
    other = Claim("d", "t", "r1", 1)
    assert claim_output(out, other) == [mine]
    assert any(k.endswith("/t.0.json") for k in s3_bucket.keys("runs/1/out/_claims/"))
    assert json.loads(s3_bucket.read([k for k in s3_bucket.keys() if k.endswith("t.1.json")][0]))["map_index"] == 1
