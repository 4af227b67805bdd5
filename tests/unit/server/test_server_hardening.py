"""The local Batch API server as a thing on the network (who may change what) and as a twin of OpenAI and Azure
(their formats, routes, expiries and error shapes), driven with the official ``openai`` SDK over 127.0.0.1."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Final

import openai
import orjson
import pytest
from openai import AzureOpenAI, OpenAI
from openai.types import Batch

from airflow_provider_synth.server.app import SynthBatchApp
from airflow_provider_synth.server.server import BatchServer, Outcome, ServerConfig, config_from_args, main

CHAT: Final = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
AZURE_VERSION = "2024-10-21"


def lines(n: int, url: str = CHAT, model: str = "gpt-4o-mini") -> bytes:
    return b"".join(
        orjson.dumps({"custom_id": f"r-{i}", "method": "POST", "url": url,
                      "body": {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]}}) + b"\n"
        for i in range(n)
    )


def http(url: str, data: dict[str, Any] | None = None, key: str | None = "sk-test") -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def finish(client: OpenAI, batch: Batch, srv: BatchServer) -> Batch:
    srv.wait_idle()
    return client.batches.retrieve(batch.id)


# --- who may change what -----------------------------------------------------------------------------------


def test_upstream_settings_are_fixed_at_start(batch_server_factory: Callable[..., BatchServer]) -> None:
    srv = batch_server_factory(upstream_url="http://127.0.0.1:9/v1", upstream_api_key="sk-upstream")
    for change in ({"upstream_url": "http://attacker.example/v1"}, {"upstream_api_key": "x"},
                   {"upstream_model": "other"}, {"upstream_concurrency": 1}):
        status, body = http(srv.url + "/_synth/config", change)
        assert status == 400 and "can only be set when the server starts" in body["error"]["message"], change
        with pytest.raises(ValueError, match="when the server starts"):
            srv.configure(**change)
    assert srv.config.upstream_url == "http://127.0.0.1:9/v1"
    status, view = http(srv.url + "/_synth/config")
    assert status == 200 and "upstream_api_key" not in view and "sk-upstream" not in json.dumps(view)


def test_control_routes_need_the_servers_own_key(batch_server_factory: Callable[..., BatchServer]) -> None:
    srv = batch_server_factory(api_key="sk-right")
    for key in (None, "sk-wrong", "any-non-empty"):
        status, body = http(srv.url + "/_synth/counters", key=key)
        assert status == 401, key
        status, _ = http(srv.url + "/_synth/config", {"fail_batches": 1}, key=key)
        assert status == 401, key
    assert srv.config.fail_batches == 0
    assert http(srv.url + "/_synth/counters", key="sk-right")[0] == 200
    azure = urllib.request.Request(srv.url + "/_synth/counters", headers={"api-key": "sk-wrong"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(azure)
    assert err.value.code == 401


def test_a_bind_beyond_loopback_without_a_key_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SYNTH_SERVER_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.example", ""):
        with pytest.raises(ValueError, match="SYNTH_SERVER_API_KEY"):
            ServerConfig(host=host)
    assert main(["--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "without an API key" in err and "SYNTH_SERVER_API_KEY" in err and "--host 127.0.0.1" in err
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert ServerConfig(host=host).host == host
    monkeypatch.setenv("SYNTH_SERVER_API_KEY", "k" * 32)
    assert config_from_args(["--host", "0.0.0.0"]).api_key == "k" * 32


def test_control_routes_are_off_on_a_bind_beyond_loopback() -> None:
    def routes(config: ServerConfig) -> set[str]:
        app = SynthBatchApp(config)
        try:
            return {r.canonical for r in app.make_app().router.resources()}
        finally:
            app.store.close()

    assert "/_synth/config" in routes(ServerConfig(host="127.0.0.1"))
    public = routes(ServerConfig(host="0.0.0.0", api_key="sk-long-random"))
    assert "/v1/batches" in public and not any(r.startswith("/_synth") for r in public)


# --- formats, routes, expiries, error shapes ---------------------------------------------------------------


def test_file_expires_after_is_honoured(batch_server: BatchServer) -> None:
    client = OpenAI(base_url=batch_server.base_url, api_key="sk-test", max_retries=0)
    kept = client.files.create(file=("in.jsonl", lines(1)), purpose="batch")
    assert kept.expires_at is None
    f = client.files.create(file=("in.jsonl", lines(1)), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 7200})
    assert f.expires_at == f.created_at + 7200
    assert client.files.retrieve(f.id).expires_at == f.expires_at
    with pytest.raises(openai.BadRequestError, match="between 3600"):
        client.files.create(file=("in.jsonl", lines(1)), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 10})
    batch_server.age([f.id], 7201)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    assert [x.id for x in client.files.list()] == [kept.id], "an expired file is gone, as on the service"


def test_batch_output_expires_after_is_honoured(batch_server: BatchServer) -> None:
    client = OpenAI(base_url=batch_server.base_url, api_key="sk-test")
    batch_server.set_outcome("r-0", Outcome.error(500))
    up = client.files.create(file=("in.jsonl", lines(3)), purpose="batch")
    batch = client.batches.create(input_file_id=up.id, endpoint=CHAT, completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 86400})
    done = finish(client, batch, batch_server)
    assert done.status == "completed" and done.output_file_id and done.error_file_id
    for file_id in (done.output_file_id, done.error_file_id):
        out = client.files.retrieve(file_id)
        assert out.expires_at == out.created_at + 86400
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=up.id, endpoint=CHAT, completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 31 * 86400})


def test_azure_v1_routes_take_no_api_version(batch_server: BatchServer) -> None:
    client = OpenAI(base_url=batch_server.url + "/openai/v1", api_key="azure-key")
    azure = AzureOpenAI(base_url=batch_server.url + "/openai/v1", api_key="azure-key", api_version="preview")
    for url, sdk in ((CHAT, client), ("/chat/completions", azure)):
        up = sdk.files.create(file=("in.jsonl", lines(4, url=url, model="my-deployment")), purpose="batch")
        batch = sdk.batches.create(input_file_id=up.id, endpoint=CHAT, completion_window="24h")
        done = finish(client, batch, batch_server)
        assert done.status == "completed" and done.request_counts and done.request_counts.completed == 4
        assert len(client.files.content(done.output_file_id).text.splitlines()) == 4  # type: ignore[arg-type]
    routes = batch_server.counters["http_requests"]
    assert routes["POST /openai/v1/batches"] == 2 and routes["POST /openai/v1/files"] == 2
    assert not any(r.startswith("POST /openai/batches") for r in routes)


def test_errors_on_azure_routes_have_azures_shape(batch_server: BatchServer) -> None:
    status, body = http(f"{batch_server.url}/openai/batches/batch_missing?api-version={AZURE_VERSION}")
    assert status == 404 and set(body["error"]) <= {"code", "message", "target"} and body["error"]["code"] == "404"
    status, body = http(f"{batch_server.url}/openai/batches", key=None)
    assert status == 400 and body["error"]["code"] == "MissingApiVersionParameter" and "type" not in body["error"]
    status, body = http(f"{batch_server.url}/v1/batches/batch_missing")
    assert status == 404 and body["error"]["type"] == "invalid_request_error", "OpenAI's shape on OpenAI's routes"
    azure = AzureOpenAI(azure_endpoint=batch_server.azure_endpoint, api_version=AZURE_VERSION, api_key="k",
                        max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        azure.batches.retrieve("batch_missing")
    assert "No batch found" in err.value.message


def test_a_cancelled_batch_counts_the_lines_of_its_error_file(batch_server: BatchServer) -> None:
    batch_server.configure(in_progress_s=30.0, progress_steps=10)
    client = OpenAI(base_url=batch_server.base_url, api_key="sk-test")
    up = client.files.create(file=("in.jsonl", lines(20)), purpose="batch")
    batch = client.batches.create(input_file_id=up.id, endpoint=CHAT, completion_window="24h")
    client.batches.cancel(batch.id)
    done = finish(client, batch, batch_server)
    assert done.status == "cancelled" and done.request_counts is not None
    errors = client.files.content(done.error_file_id).text.splitlines()  # type: ignore[arg-type]
    out = client.files.content(done.output_file_id).text.splitlines() if done.output_file_id else []
    assert (done.request_counts.completed, done.request_counts.failed) == (len(out), len(errors))
    assert len(out) + len(errors) == 20 and len(errors) > 0


def test_client_error_lines_do_not_read_like_server_errors(batch_server: BatchServer) -> None:
    for i, status in enumerate((400, 404, 422, 503)):
        batch_server.set_outcome(f"r-{i}", Outcome.error(status))
    client = OpenAI(base_url=batch_server.base_url, api_key="sk-test")
    up = client.files.create(file=("in.jsonl", lines(4)), purpose="batch")
    done = finish(client, client.batches.create(input_file_id=up.id, endpoint=CHAT, completion_window="24h"),
                  batch_server)
    rows = {r["custom_id"]: r["response"] for r in map(json.loads, client.files.content(
        done.error_file_id).text.splitlines())}  # type: ignore[arg-type]
    for row in rows.values():
        message = row["body"]["error"]["message"]
        assert ("server had an error" in message) == (row["status_code"] >= 500), row
