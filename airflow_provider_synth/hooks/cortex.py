"""Snowflake Cortex batch hooks, on top of the snowflake provider's ``SnowflakeHook`` connection.

:class:`CortexHook` (operators) runs the statements of a batch through the Snowflake connector: bulk staging
(``write_pandas``: a Parquet PUT and one COPY per batch of rows, never one INSERT per row), asynchronous
submission (``execute_async`` and the query id, optionally under a ``QUERY_TAG`` of its own), status
(``get_query_status``), a session's statements (``INFORMATION_SCHEMA.QUERY_HISTORY_BY_SESSION``), streaming
read-back (``fetchmany``) and cancellation (``SYSTEM$CANCEL_QUERY``). Values are always bound server-side
(``qmark``).

:class:`CortexAsyncHook` (triggers) asks the SQL API ``GET /api/v2/statements/{handle}`` with ``aiohttp``,
authenticated by the snowflake provider's public ``SnowflakeSqlApiHook.get_headers()`` (key-pair JWT, OAuth or
PAT), the connection fetched asynchronously: the triggerer's event loop never waits on a socket or a lock.

No new place for secrets: both read the ``snowflake`` connection.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.connection import get_async_extra_dejson
from airflow.providers.snowflake.hooks.snowflake import SnowflakeHook

from airflow_provider_synth._compat import aget_connection, snowflake_conn_params
from airflow_provider_synth.batch.results import is_transient_status

if TYPE_CHECKING:
    import aiohttp
    from airflow.providers.common.compat.sdk import Connection
    from snowflake.connector import SnowflakeConnection

#: Rows per bulk write when staging requests (one Parquet file and one COPY each).
STAGE_BATCH_ROWS = 50_000
#: Rows fetched per round trip when reading answers back.
FETCH_ROWS = 10_000
STAGING_COLUMNS = ("CUSTOM_ID", "SEQ", "PROMPT", "CONVERSATION", "MODEL_PARAMETERS", "RESPONSE_FORMAT")


#: What a Snowflake account or region may look like before it goes into a URL (letters, digits, ".", "_", "-").
_ACCOUNT_PART = re.compile(r"^[A-Za-z0-9._-]+$")
#: The headers of the provider's SQL API auth that this hook sends.
_AUTH_HEADERS = ("Authorization", "X-Snowflake-Authorization-Token-Type")


def sql_api_base_url(conn_config: Mapping[str, Any], extras: Mapping[str, Any]) -> str:
    """The base URL of the account's REST APIs.

    The extras ``host`` (with optional ``port`` and ``protocol``, the connector's own options) win, e.g. for a
    private-link host; otherwise ``https://<account>[.<region>].snowflakecomputing.com``, the host the
    provider's SQL API hook uses.
    """
    host = extras.get("host")
    if host:
        protocol = extras.get("protocol") or "https"
        port = extras.get("port")
        return f"{protocol}://{host}" + (f":{port}" if port else "")
    parts = [conn_config.get("account"), conn_config.get("region") or None]
    for name, part in zip(("account", "region"), parts, strict=True):
        if part is not None and not (isinstance(part, str) and _ACCOUNT_PART.fullmatch(part)):
            raise ValueError(f"Invalid Snowflake {name} {part!r}: only letters, digits, '.', '_' and '-' are allowed")
    if not parts[0]:
        raise ValueError("the Snowflake connection has no account")
    return "https://" + ".".join(p for p in parts if p) + ".snowflakecomputing.com"


# -- SQL of the hook's own calls, and identifier quoting ----------------------------------------------------

_PLAIN_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,254}$")

#: One statement as the connector's ``qmark`` binding takes it: ``(text, params)``.
Statement = tuple[str, tuple[Any, ...]]


def quote_ident(name: str) -> str:
    """Quote one identifier part.

    :param name: ``my_table`` (resolved as ``MY_TABLE``, like Snowflake) or ``"My Table"`` (case kept).
    :raises ValueError: for an empty name or an unquoted name with characters a plain identifier cannot have.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("an identifier must be a non-empty string")
    if len(name) >= 2 and name[0] == '"' and name[-1] == '"':
        inner = name[1:-1].replace('""', '"')
        if not inner:
            raise ValueError("an identifier must be a non-empty string")
        return '"' + inner.replace('"', '""') + '"'
    if not _PLAIN_IDENT.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a plain Snowflake identifier (letters, digits, _ and $, not starting with a digit); "
            'wrap it in double quotes, e.g. \'"My Table"\', to use it as a quoted identifier'
        )
    return '"' + name.upper() + '"'


def qualified(*parts: str | None) -> str:
    """Join quoted parts, skipping ``None`` (an unset database or schema falls back to the session's)."""
    return ".".join(quote_ident(p) for p in parts if p)


def string_literal(text: str) -> str:
    """A Snowflake single-quoted string literal, for the few places that cannot take a bind parameter (a table
    ``COMMENT``, ``ALTER SESSION SET QUERY_TAG``): backslashes and quotes are escaped, control characters
    refused, so the text can never end the literal."""
    if any(ord(ch) < 32 for ch in text):
        raise ValueError("a string literal here may not hold control characters")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def history_of_session(session_id: str, marker: str, limit: int = 10_000, database: str | None = None) -> Statement:
    """The statements of one session whose ``QUERY_TAG`` contains ``marker`` (a run's table prefix), running
    or finished: ``(query_id, query_tag, execution_status, error_message, query_type, query_text[:20])``.

    ``INFORMATION_SCHEMA.QUERY_HISTORY_BY_SESSION`` returns running queries too when no
    ``END_TIME_RANGE_END`` is given, and the most recent ``RESULT_LIMIT`` (at most 10,000) of the session; a
    session of this provider submits a run's chunks one after the other and stops at its first error, so a
    statement whose record was lost is among its last queries. The type and the start of the text tell the
    chunk's ``INSERT`` from the ``ALTER SESSION`` that sets the tag back (whichever tag Snowflake records for
    that one). ``database``: whose ``INFORMATION_SCHEMA`` to ask (the staging database; default: the
    session's current database).
    """
    info = qualified(database, "INFORMATION_SCHEMA") if database else "INFORMATION_SCHEMA"
    return (
        "SELECT QUERY_ID, QUERY_TAG, EXECUTION_STATUS, ERROR_MESSAGE, QUERY_TYPE, LEFT(QUERY_TEXT, 20) "
        f"FROM TABLE({info}.QUERY_HISTORY_BY_SESSION(SESSION_ID => ?, RESULT_LIMIT => ?)) "
        "WHERE CONTAINS(QUERY_TAG, ?) ORDER BY START_TIME",
        (int(session_id) if session_id.isdigit() else session_id, int(limit), marker),
    )


def current_session() -> Statement:
    return ("SELECT CURRENT_SESSION()", ())


def set_query_tag(tag: str | None) -> Statement:
    """``ALTER SESSION SET QUERY_TAG`` (``UNSET`` for ``None``); the tag is a literal (no bind here)."""
    if tag is None:
        return ("ALTER SESSION UNSET QUERY_TAG", ())
    if len(tag) > 2000:
        raise ValueError("a QUERY_TAG holds at most 2,000 characters")
    return (f"ALTER SESSION SET QUERY_TAG = {string_literal(tag)}", ())


def cancel_query(query_id: str) -> Statement:
    return ("SELECT SYSTEM$CANCEL_QUERY(?)", (query_id,))


# -- the hook's classification: its states and errors, as the verdict takes them -----------------------------
# The hook only names what it saw; the verdict (``batch.status``) decides what a waiter does with it. A state
# no table knows is passed on under its own name (the verdict stops on it: UNKNOWN), and an HTTP answer that
# says nothing about the statement (429, 5xx, 401, 404...) is a polling error, transient or not.

_CONNECTOR_RUNNING = frozenset({"RUNNING", "RESUMING_WAREHOUSE", "QUEUED", "QUEUED_REPARING_WAREHOUSE",
                                "QUEUED_REPAIRING_WAREHOUSE", "BLOCKED", "NO_DATA"})
_CONNECTOR_ERROR = frozenset({"ABORTING", "ABORTED", "FAILED_WITH_ERROR", "FAILED_WITH_INCIDENT", "DISCONNECTED",
                              "RESTARTED"})
#: HTTP answers of the SQL API about a statement that ended in error: 422 (execution failed, with
#: Snowflake's code and SQL state) and 408 (it ran past its ``STATEMENT_TIMEOUT_IN_SECONDS`` and was cancelled).
_SQL_API_STATEMENT_FAILED = frozenset({408, 422})
#: The connector's errors that may go away by themselves (after its own retries): network, throttling, 5xx.
_CONNECTOR_TRANSIENT = ("OperationalError", "ServiceUnavailableError", "GatewayTimeoutError", "BadGatewayError",
                        "InternalServerError", "OtherHTTPRetryableError", "TooManyRequests", "RequestTimeoutError",
                        "RequestExceedMaxRetryError")


@dataclass(frozen=True)
class StatementStatus:
    """Where one statement stands.

    :param query_id: the statement's query id (the SQL API's statement handle).
    :param state: ``running``, ``success`` or ``error`` (:data:`~airflow_provider_synth.batch.status.
        STATEMENT_PHASES`), or the connector's own name of a state no table knows (the verdict stops on it).
    :param message: Snowflake's message (never contains credentials).
    """

    query_id: str
    state: str
    message: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"query_id": self.query_id, "state": self.state, "message": self.message}


class StatementPollError(Exception):
    """The SQL API answered a poll without saying how the statement stands (HTTP 429, 5xx, 401, 403, 404...).

    :param query_id: the statement polled.
    :param http_status: the HTTP status.
    :param message: Snowflake's message (never contains credentials).
    """

    def __init__(self, query_id: str, http_status: int, message: str) -> None:
        self.query_id = query_id
        self.http_status = http_status
        super().__init__(message)

    @property
    def transient(self) -> bool:
        return is_transient_status(self.http_status)


def status_from_connector(query_id: str, status_name: str) -> StatementStatus:
    """Name a ``snowflake.connector.constants.QueryStatus`` in the verdict's terms (an unknown one as itself)."""
    if status_name == "SUCCESS":
        return StatementStatus(query_id, "success", "statement succeeded")
    if status_name in _CONNECTOR_RUNNING:
        return StatementStatus(query_id, "running", status_name)
    if status_name in _CONNECTOR_ERROR:
        return StatementStatus(query_id, "error", f"statement ended {status_name}")
    return StatementStatus(query_id, status_name or "<empty>", f"unknown statement status {status_name!r}")


def status_from_sql_api(query_id: str, http_status: int, payload: Mapping[str, Any] | None) -> StatementStatus:
    """Name an answer of ``GET /api/v2/statements/{handle}`` in the verdict's terms.

    200 is success, 202 still running, 422 and 408 a statement that ended in error (with Snowflake's code and
    SQL state).

    :raises StatementPollError: for any other answer (429 and 5xx are transient, 401, 403, 404... are not):
        the answer says nothing about the statement.
    """
    payload = payload or {}
    message = str(payload.get("message") or "")
    if http_status == 200:
        return StatementStatus(query_id, "success", message or "statement succeeded")
    if http_status == 202:
        return StatementStatus(query_id, "running", message or "HTTP 202")
    details = [f"{k}: {payload[k]}" for k in ("code", "sqlState") if payload.get(k)]
    suffix = f" ({', '.join(details)})" if details else ""
    text = f"HTTP {http_status}: {message or 'no message'}{suffix}"
    if http_status in _SQL_API_STATEMENT_FAILED:
        return StatementStatus(query_id, "error", text)
    raise StatementPollError(query_id, http_status, text)


def is_transient(error: BaseException) -> bool:
    """Whether a polling error may go away by itself: a connection reset, a timeout, a throttled or briefly
    unavailable service (the SQL API's 429 and 5xx, the connector's network and HTTP-retryable errors).

    :param error: what a call of the hook raised.
    """
    if isinstance(error, StatementPollError):
        return error.transient
    if type(error).__module__.startswith("snowflake.connector"):
        if type(error).__name__ == "NonRetryableTlsError":
            return False
        return any(cls.__name__ in _CONNECTOR_TRANSIENT for cls in type(error).__mro__)
    if isinstance(error, asyncio.TimeoutError | ConnectionError):
        return True
    aiohttp = sys.modules.get("aiohttp")  # an aiohttp error comes only from a process that loaded it
    return aiohttp is not None and isinstance(error, aiohttp.ClientConnectionError)


class CortexHook(SnowflakeHook):
    """Run a Cortex batch's statements through the Snowflake connector.

    :param snowflake_conn_id: the :ref:`Snowflake connection <howto/connection:snowflake>` (any auth the
        snowflake provider supports: password, key pair, OAuth, PAT).
    :param query_tag: set as the session's ``QUERY_TAG``, so every statement shows who ran it.
    :param kwargs: passed to ``SnowflakeHook`` (``warehouse``, ``role``, ``database``, ``schema``...).
    """

    hook_name = "Snowflake Cortex (batch)"

    def __init__(self, snowflake_conn_id: str = "snowflake_default", *, query_tag: str | None = None,
                 **kwargs: Any) -> None:
        session_parameters = dict(kwargs.pop("session_parameters", None) or {})
        if query_tag:
            session_parameters["QUERY_TAG"] = query_tag
        super().__init__(snowflake_conn_id=snowflake_conn_id, session_parameters=session_parameters or None,
                         **kwargs)
        self.snowflake_conn_id = snowflake_conn_id
        self.query_tag = query_tag

    def get_conn(self) -> SnowflakeConnection:
        """A new connector connection that binds values server-side (``paramstyle="qmark"``)."""
        from snowflake.connector import connect

        return connect(**snowflake_conn_params(self), paramstyle="qmark")

    @cached_property
    def client(self) -> SnowflakeConnection:
        """The hook's one connector connection, opened on first use (closed by :meth:`close`)."""
        return self.get_conn()

    def close(self) -> None:
        """Close the connection if it was opened. Asynchronous statements keep running server-side."""
        self.__dict__.pop("session_id", None)
        if "client" in self.__dict__:
            self.__dict__.pop("client").close()

    @cached_property
    def session_id(self) -> str:
        """The Snowflake session of :attr:`client` (``CURRENT_SESSION()``)."""
        return str(self.fetch_all(current_session())[0][0])

    def run_statements(self, statements: Iterable[Statement]) -> None:
        """Run statements one after the other, waiting for each."""
        with self.client.cursor() as cur:
            for sql, params in statements:
                cur.execute(sql, params or None)

    def fetch_all(self, statement: Statement) -> list[tuple[Any, ...]]:
        """Run a small query and return its rows."""
        sql, params = statement
        with self.client.cursor() as cur:
            cur.execute(sql, params or None)
            return list(cur.fetchall())

    def iter_rows(self, statement: Statement, batch_rows: int = FETCH_ROWS) -> Iterator[tuple[Any, ...]]:
        """Stream a query's rows, ``batch_rows`` per round trip: memory stays flat whatever the row count."""
        sql, params = statement
        with self.client.cursor() as cur:
            cur.execute(sql, params or None)
            while rows := cur.fetchmany(batch_rows):
                yield from rows

    def bulk_write(self, table: tuple[str | None, str | None, str], rows: Iterable[Sequence[Any]],
                   batch_rows: int = STAGE_BATCH_ROWS) -> int:
        """Append rows of :data:`STAGING_COLUMNS` to a table with the connector's bulk writer.

        :param table: ``(database, schema, table)``, unquoted, as the bulk writer takes them.
        :return: the number of rows written.
        """
        import pandas as pd
        from snowflake.connector.pandas_tools import write_pandas

        database, schema, name = table
        written, batch = 0, list[Sequence[Any]]()

        def flush() -> int:
            frame = pd.DataFrame(batch, columns=list(STAGING_COLUMNS))
            ok, _, nrows, _ = write_pandas(self.client, frame, name, database=database, schema=schema,
                                           quote_identifiers=True, auto_create_table=False)
            if not ok:
                raise RuntimeError(f"bulk write into {'.'.join(p for p in table if p)} failed")
            batch.clear()
            return int(nrows)

        for row in rows:
            batch.append(row)
            if len(batch) >= batch_rows:
                written += flush()
        if batch:
            written += flush()
        return written

    def submit(self, statement: Statement, query_tag: str | None = None) -> str:
        """Submit a statement asynchronously; return its query id at once. It runs on after the connection
        closes (unless the account sets ``ABORT_DETACHED_QUERY``).

        :param statement: ``(sql, params)``.
        :param query_tag: the ``QUERY_TAG`` this one statement carries (the session's tag is set back after
            the submit), so that it can be found in the session's query history even if its query id is lost.
        """
        sql, params = statement
        with self.client.cursor() as cur:
            if query_tag is not None:
                cur.execute(set_query_tag(query_tag)[0])
            cur.execute_async(sql, params or None)
            query_id = cur.sfqid
            if query_tag is not None:
                cur.execute(set_query_tag(self.query_tag)[0])
        if not query_id:
            raise RuntimeError("Snowflake returned no query id for an asynchronous statement")
        return str(query_id)

    def find_statements(self, session_id: str, marker: str, database: str | None = None
                        ) -> list[tuple[str, str, StatementStatus]]:
        """The ``INSERT`` statements of a session (running or finished) whose query tag contains ``marker``:
        ``(query_id, query_tag, status)``, oldest first (``INFORMATION_SCHEMA.QUERY_HISTORY_BY_SESSION`` of
        ``database``, default the current one)."""
        rows = self.fetch_all(history_of_session(session_id, marker, database=database))
        found = []
        for query_id, tag, execution_status, error, query_type, text in rows:
            if str(query_type or "").upper() != "INSERT" and not str(text or "").lstrip().upper().startswith("INSERT"):
                continue
            status = status_from_connector(str(query_id), str(execution_status or "").upper())
            if status.state == "error" and error:
                status = StatementStatus(status.query_id, "error", f"{status.message}: {error}")
            found.append((str(query_id), str(tag or ""), status))
        return found

    def get_statement_status(self, query_id: str) -> StatementStatus:
        """Ask the connector how a statement stands (no wait)."""
        status = self.client.get_query_status(query_id)
        result = status_from_connector(query_id, status.name)
        if result.state == "error":
            try:
                self.client.get_query_status_throw_if_error(query_id)
            except Exception as exc:  # the connector's ProgrammingError carries Snowflake's message
                return StatementStatus(query_id, "error", f"{result.message}: {exc}")
        return result

    def cancel_statement(self, query_id: str) -> None:
        """Cancel a running statement (``SYSTEM$CANCEL_QUERY``); a finished one is left as it is."""
        self.run_statements([cancel_query(query_id)])

    def test_connection(self) -> tuple[bool, str]:  # type: ignore[override]
        """Open a session and run ``SELECT 1``: proves the credentials without calling any model."""
        try:
            self.fetch_all(("SELECT 1", ()))
        except Exception as exc:
            return False, f"Snowflake connection failed: {exc}"
        finally:
            self.close()
        return True, "Snowflake connection works (no Cortex model was called)."


class CortexAsyncHook(CortexHook):
    """Poll and cancel statements through the SQL API without blocking the event loop.

    The connection comes from the async lookup; auth headers (a key-pair JWT signed, an OAuth token
    refreshed) are built by the provider's ``SnowflakeSqlApiHook.get_headers()`` in a worker thread, because
    the provider's token code is synchronous.
    """

    def __init__(self, snowflake_conn_id: str = "snowflake_default", **kwargs: Any) -> None:
        super().__init__(snowflake_conn_id, **kwargs)
        self._async_conn: Connection | None = None
        self._extras: dict[str, Any] = {}
        self._session: aiohttp.ClientSession | None = None
        self._api_hook: Any = None

    def get_connection(self, conn_id: str) -> Connection:
        # The provider's token code asks for the connection synchronously; hand it the one fetched async.
        if self._async_conn is not None and conn_id == self.snowflake_conn_id:
            return self._async_conn
        conn: Connection = super().get_connection(conn_id)
        return conn

    async def _prepare(self) -> None:
        if self._async_conn is None:
            conn = await aget_connection(self.snowflake_conn_id, hook=self)
            self._extras = await get_async_extra_dejson(conn)
            self._async_conn = conn

    def _auth_headers(self) -> dict[str, str]:
        if self._api_hook is None:
            self._api_hook = _sql_api_hook(self)
        headers = self._api_hook.get_headers()
        return {k: str(headers[k]) for k in _AUTH_HEADERS if k in headers}

    async def _request(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        import aiohttp

        await self._prepare()
        account = {k: self._extras.get(k) or self._extras.get(f"extra__snowflake__{k}") for k in ("account", "region")}
        base = sql_api_base_url(account, self._extras)
        headers = {"Accept": "application/json", "Content-Type": "application/json",
                   "User-Agent": "airflow-provider-synth", **await asyncio.to_thread(self._auth_headers)}
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        async with self._session.request(method, base + path, headers=headers) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else {}
            except ValueError:
                payload = {"message": text[:500]}
            return resp.status, payload if isinstance(payload, dict) else {}

    async def poll_statement(self, query_id: str) -> StatementStatus:
        """``GET /api/v2/statements/{query_id}``, classified by :func:`status_from_sql_api`.

        :raises StatementPollError: for an answer that says nothing about the statement (429, 5xx, 401, 404...).
        """
        status, payload = await self._request("GET", f"/api/v2/statements/{_segment(query_id)}")
        return status_from_sql_api(query_id, status, payload)

    async def acancel_statement(self, query_id: str) -> StatementStatus:
        """``POST /api/v2/statements/{query_id}/cancel``."""
        status, payload = await self._request("POST", f"/api/v2/statements/{_segment(query_id)}/cancel")
        return status_from_sql_api(query_id, status, payload)

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> CortexAsyncHook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _sql_api_hook(owner: CortexAsyncHook) -> Any:
    """The snowflake provider's ``SnowflakeSqlApiHook`` on ``owner``'s connection (fetched asynchronously):
    its public ``get_headers()`` builds the SQL API auth (key-pair JWT, OAuth, PAT) and keeps the JWT it signed
    until renewal. It looks the connection up synchronously, so it is handed the one ``owner`` fetched."""
    from airflow.providers.snowflake.hooks.sql_api import SnowflakeSqlApiHook

    class _OnFetchedConnection(SnowflakeSqlApiHook):
        def get_connection(self, conn_id: str) -> Connection:
            return owner.get_connection(conn_id)

    return _OnFetchedConnection(owner.snowflake_conn_id)


def _segment(value: str) -> str:
    """``value`` as one URL path segment: a query id can never reach another path or add a query string."""
    return urllib.parse.quote(value, safe="")
