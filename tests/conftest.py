"""Shared pytest configuration. Edit with small, targeted changes: every engineer adds to this file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

# batch_server / batch_server_factory: the local OpenAI/Azure Batch API server. Installed with the [testing]
# extra, the plugin comes through its pytest11 entry point (same name: this line is then a no-op); a checkout
# whose installed metadata predates the entry point still gets it here.
pytest_plugins = ["airflow_provider_synth.testing.pytest_plugin"]

REPO = Path(__file__).resolve().parent.parent
# Airflow reads its configuration when first imported: point it at a throw-away home before any test module
# imports it. The example DAGs are the dags folder, so dag.test() runs them as users copy them.
os.environ["AIRFLOW_HOME"] = os.environ.get("SYNTH_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="synth-airflow-")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "example_dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("AIRFLOW__CORE__ALLOWED_DESERIALIZATION_CLASSES_REGEXP", ".*")


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated SQLite metadata database in the test AIRFLOW_HOME (once per session)."""
    from airflow.utils import db

    db.resetdb()
    return os.environ["AIRFLOW_HOME"]



@pytest.fixture
def group_members() -> Callable[[int], list[psutil.Process]]:
    """The live (not zombie) processes of a process group: what is left of an engine after its task died."""

    def members(pgid: int) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    return members


# -- a real S3 API on 127.0.0.1 (moto's standalone server) behind an Airflow `aws` connection ---------------------


class S3Bucket:
    """One test's bucket on the moto server, reached through the Airflow connection ``conn_id``.

    ``url(key)`` is the ``s3://conn_id@bucket/key`` form (``url(key, conn=False)``: ``s3://bucket/key``, which
    uses ``aws_default``); ``client`` is a boto3 S3 client on the same server, for checking what landed;
    ``outage()`` stops the server for the ``with`` block (connections refused), then starts it again on the same
    port with its contents kept.
    """

    def __init__(self, server: MotoS3, conn_id: str, bucket: str) -> None:
        self.server, self.conn_id, self.bucket = server, conn_id, bucket
        self.endpoint_url = server.endpoint_url
        self.client = server.client()

    def url(self, key: str = "", *, conn: bool = True) -> str:
        return f"s3://{self.conn_id + '@' if conn else ''}{self.bucket}/{key.lstrip('/')}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def outage(self) -> Any:
        return self.server.outage()

    def connection_env(self, conn_id: str) -> tuple[str, str]:
        """``(AIRFLOW_CONN_<ID>, value)`` of another ``aws`` connection to the same server."""
        return s3_connection(self.endpoint_url, conn_id)


class MotoS3:
    """moto's standalone S3 server on 127.0.0.1 (a free port), shared by the session's tests."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{self.host}:{self.port}"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        self._server.stop()
        try:
            yield
        finally:  # moto keeps its buckets in this process: a new server on the same port serves them again
            self._server = self._cls(ip_address=self.host, port=self.port, verbose=False)
            self._server.start()

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's S3 server, started once per session (skipped where ``moto[server]`` is not installed)."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    pytest.importorskip("s3fs", reason="needs s3fs (the s3 extra)")
    pytest.importorskip("airflow.providers.amazon", reason="needs the Amazon provider (the s3 extra)")
    server = MotoS3()
    yield server
    server.stop()


def s3_connection(endpoint_url: str, conn_id: str = "aws_default") -> tuple[str, str]:
    """The ``AIRFLOW_CONN_*`` variable and JSON value of an ``aws`` connection to ``endpoint_url``: keys in
    login/password, the endpoint in the extra, as users configure MinIO or LocalStack."""
    value = json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                        "extra": {"endpoint_url": endpoint_url, "region_name": "us-east-1"}})
    return f"AIRFLOW_CONN_{conn_id.upper()}", value


def _forget_s3_stores() -> None:
    # Airflow caches one filesystem per (scheme, connection) in the process; a test's connection points at this
    # session's server, so a filesystem cached by an earlier test (another endpoint, or none) must not be reused
    from airflow.sdk.io import store

    for alias in [a for a in store._STORE_CACHE if a.startswith(("s3", "gs"))]:
        del store._STORE_CACHE[alias]


@pytest.fixture
def s3_bucket(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh bucket on moto's S3 server, reached through the Airflow ``aws`` connection ``aws_default``
    (set as ``AIRFLOW_CONN_AWS_DEFAULT``, inherited by subprocesses). The environment holds no AWS credentials,
    so nothing works unless the connection is used."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv(*s3_connection(moto_s3.endpoint_url))
    bucket = f"synth-{uuid.uuid4().hex[:12]}"
    moto_s3.client().create_bucket(Bucket=bucket)
    _forget_s3_stores()
    yield S3Bucket(moto_s3, "aws_default", bucket)
    _forget_s3_stores()
