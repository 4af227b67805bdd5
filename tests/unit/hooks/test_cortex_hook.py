"""CortexHook against fakesnow (the real connector API on DuckDB) and CortexAsyncHook against a local SQL API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fakes.cortex import FakeCortex, FakeSqlApi

from airflow_provider_synth.batch.status import STATEMENTS, Next, PollError, verdict
from airflow_provider_synth.hooks.cortex import (
    CortexAsyncHook,
    CortexHook,
    StatementPollError,
    is_transient,
    sql_api_base_url,
    status_from_connector,
    status_from_sql_api,
)
from airflow_provider_synth.runs import cortex_mapping as cortex
from airflow_provider_synth.runs.cortex_sql import StagingTables

PAT = "pat-secret-0123456789"


def snowflake_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str = "sf_test", **extra: Any) -> str:
    payload = {"conn_type": "snowflake", "login": "synth_user", "password": PAT, "schema": "PUBLIC",
               "extra": {"account": "acct", "database": "SYNTH_DB", "warehouse": "WH", **extra}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(payload))
    return conn_id


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCortex]:
    snowflake_conn(monkeypatch)
    with FakeCortex() as fc:
        yield fc


def _calls(*prompts: str) -> list[tuple]:
    rows = []
    for seq, text in enumerate(prompts, start=1):
        call = cortex.map_chat_body(f"id-{seq}", {"messages": [{"role": "user", "content": text}]})
        rows.append(cortex.staging_row(seq, call))
    return rows


def test_query_tag_and_server_side_binding(fake: FakeCortex):
    hook = CortexHook("sf_test", query_tag='{"dag_id": "d"}')
    assert hook._get_conn_params()["session_parameters"] == {"QUERY_TAG": '{"dag_id": "d"}'}
    assert hook.client._paramstyle == "qmark"
    hook.close()


def test_stage_submit_status_and_read_back(fake: FakeCortex):
    hook = CortexHook("sf_test")
    tables = StagingTables(None, None, "T_HOOK")
    hook.run_statements(tables.create())
    assert hook.bulk_write(tables.plain_names(), iter(_calls("a", "b", "c")), batch_rows=2) == 3
    assert hook.fetch_all(tables.count_requests()) == [(3,)]
    query_id = hook.submit(tables.complete_chunk("llama3.1-8b", 0, 10))
    assert hook.get_statement_status(query_id).state == "success"
    rows = list(hook.iter_rows(tables.read_back(), batch_rows=1))
    assert [r[0] for r in rows] == ["id-1", "id-2", "id-3"] and all(r[1] for r in rows)
    assert fake.calls == ["a", "b", "c"]
    # the same chunk again pays nothing: every row is answered
    hook.submit(tables.complete_chunk("llama3.1-8b", 0, 10))
    assert len(fake.calls) == 3
    hook.close()


def test_values_cannot_inject_sql(fake: FakeCortex):
    """A custom_id, a prompt and a model name made of SQL travel as bound values and arrive verbatim."""
    evil = "x'); DROP TABLE \"T_EVIL_REQUESTS\"; --"
    hook = CortexHook("sf_test")
    tables = StagingTables(None, None, "T_EVIL")
    hook.run_statements(tables.create())
    call = cortex.map_chat_body(evil, {"messages": [{"role": "user", "content": evil}]})
    hook.bulk_write(tables.plain_names(), [cortex.staging_row(1, call)])
    hook.submit(tables.complete_chunk(evil, 0, 10))
    assert fake.calls == [evil]
    (cid, answered, output), = hook.iter_rows(tables.read_back())
    assert cid == evil and answered and json.loads(output)["value"]["model"] == evil
    assert hook.fetch_all(tables.count_requests()) == [(1,)]
    hook.close()


def test_status_of_failed_and_running_statements_and_cancel(fake: FakeCortex):
    hook = CortexHook("sf_test")
    fake.statuses["q-run"] = "RUNNING"
    fake.statuses["q-bad"] = "FAILED_WITH_ERROR"
    assert hook.get_statement_status("q-run").state == "running"
    bad = hook.get_statement_status("q-bad")
    assert bad.state == "error" and "statement q-bad failed" in bad.message
    hook.cancel_statement("q-run")
    assert fake.cancelled == ["q-run"]
    hook.close()


def test_test_connection_spends_no_tokens(fake: FakeCortex):
    ok, message = CortexHook("sf_test").test_connection()
    assert ok and "no Cortex model was called" in message
    assert fake.calls == []


def test_sql_api_base_url():
    assert sql_api_base_url({"account": "xy123", "region": "us-east-2.aws"}, {}) == \
        "https://xy123.us-east-2.aws.snowflakecomputing.com"
    assert sql_api_base_url({}, {"host": "127.0.0.1", "port": 8080, "protocol": "http"}) == "http://127.0.0.1:8080"
    assert sql_api_base_url({}, {"host": "acct.privatelink.snowflakecomputing.com"}) == \
        "https://acct.privatelink.snowflakecomputing.com"
    assert sql_api_base_url({"account": "xy123", "region": ""}, {}) == "https://xy123.snowflakecomputing.com"
    for bad in ({"account": "evil.example/x?"}, {"account": "a", "region": "r@h"}, {"account": None}):
        with pytest.raises(ValueError):  # nothing that would change which host the token goes to
            sql_api_base_url(bad, {})


@pytest.fixture
def sql_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSqlApi]:
    api = FakeSqlApi(running_polls=1, errors={"q-err": "Cortex function failed"})
    with api.serve():
        snowflake_conn(monkeypatch, "sf_api", host="127.0.0.1", port=api.port, protocol="http",
                       authenticator="programmatic_access_token")
        yield api


async def test_async_hook_polls_the_sql_api_with_the_connection_auth(sql_api: FakeSqlApi,
                                                                      monkeypatch: pytest.MonkeyPatch):
    def no_sync_lookup(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the async hook must fetch the connection asynchronously")

    async with CortexAsyncHook("sf_api") as hook:
        monkeypatch.setattr("airflow.sdk.bases.hook.BaseHook.get_connection", classmethod(no_sync_lookup))
        first = await hook.poll_statement("q-ok")
        second = await hook.poll_statement("q-ok")
        await hook.poll_statement("q-err")
        failed = await hook.poll_statement("q-err")
        cancelled = await hook.acancel_statement("q-run")
    assert (first.state, second.state) == ("running", "success")
    assert failed.state == "error" and "Cortex function failed" in failed.message
    assert cancelled.state == "success" and sql_api.cancelled == ["q-run"]
    assert set(sql_api.auth_headers) == {f"Bearer {PAT}"}


async def test_async_hook_signs_a_key_pair_jwt_off_the_loop(monkeypatch: pytest.MonkeyPatch):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    api = FakeSqlApi(running_polls=0)
    with api.serve():
        payload = {"conn_type": "snowflake", "login": "synth_user", "schema": "PUBLIC",
                   "extra": {"account": "acct", "host": "127.0.0.1", "port": api.port, "protocol": "http",
                             "private_key_content": pem}}
        monkeypatch.setenv("AIRFLOW_CONN_SF_JWT", json.dumps(payload))
        async with CortexAsyncHook("sf_jwt") as hook:
            status = await hook.poll_statement("q-1")
    assert status.state == "success"
    assert api.token_types == ["KEYPAIR_JWT"]
    token = api.auth_headers[0].removeprefix("Bearer ")
    import jwt

    claims = jwt.decode(token, key.public_key(), algorithms=["RS256"], options={"verify_aud": False})
    assert claims["sub"] == "ACCT.SYNTH_USER"


async def test_query_ids_are_one_quoted_path_segment(sql_api: FakeSqlApi) -> None:
    odd = "01b2-../../sessions?x=1#f"
    async with CortexAsyncHook("sf_api") as hook:
        status = await hook.poll_statement(odd)
        await hook.acancel_statement(odd)
    assert status.state == "running", "the statement's own route answered (202), not another one"
    assert sql_api.polls == {odd: 1} and sql_api.cancelled == [odd]


# -- the hook names what it saw; the verdict decides ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "state"),
    [("SUCCESS", "success"), ("RUNNING", "running"), ("QUEUED", "running"), ("RESUMING_WAREHOUSE", "running"),
     ("FAILED_WITH_ERROR", "error"), ("ABORTED", "error")],
)
def test_connector_status_classification(name, state):
    assert status_from_connector("q", name).state == state


def test_an_unknown_connector_state_is_passed_on_for_the_verdict_to_stop_on():
    """Old main made an unknown state a terminal "error" (the run then read back and accounted its rows as
    missing): the hook decided before the verdict. Now the verdict sees the state and says UNKNOWN."""
    status = status_from_connector("q", "SOMETHING_NEW")
    assert status.state == "SOMETHING_NEW" and "unknown statement status" in status.message
    assert verdict({"q": status.state}, kind=STATEMENTS).next is Next.UNKNOWN


def test_sql_api_statement_answers():
    assert status_from_sql_api("q", 200, {"message": "ok"}).state == "success"
    assert status_from_sql_api("q", 202, {"message": "in progress"}).state == "running"
    failed = status_from_sql_api("q", 422, {"message": "boom", "code": "100132", "sqlState": "P0000"})
    assert failed.state == "error" and failed.message == "HTTP 422: boom (code: 100132, sqlState: P0000)"
    assert status_from_sql_api("q", 408, {"message": "timeout"}).state == "error"


@pytest.mark.parametrize(("http_status", "transient"), [(429, True), (500, True), (503, True), (504, True),
                                                          (401, False), (403, False), (404, False), (400, False)])
def test_sql_api_answers_about_no_statement_are_polling_errors(http_status, transient):
    """Old main made 429/5xx "running" (never counted against max_consecutive_errors: a throttled poll waited
    forever) and 401/403/404 a failed statement. Now they are polling errors the verdict counts or stops on."""
    with pytest.raises(StatementPollError) as err:
        status_from_sql_api("q", http_status, {"message": "no"})
    assert is_transient(err.value) is transient
    outcome = verdict({"q": "running"}, kind=STATEMENTS, error=PollError.of([transient]),
                      last_error=("q", str(err.value)), consecutive_errors=6, max_consecutive_errors=5)
    assert outcome.next is Next.FAILED


def test_connector_errors_are_classified():
    from snowflake.connector import errors

    assert is_transient(errors.OperationalError("Failed to connect"))
    assert is_transient(errors.ServiceUnavailableError())
    assert not is_transient(errors.ProgrammingError("SQL compilation error"))
    assert not is_transient(errors.ForbiddenError())
    assert not is_transient(ValueError("bad private key"))
    assert is_transient(ConnectionResetError())
