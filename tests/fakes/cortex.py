"""Fakes for Snowflake Cortex, for tests and local runs without an account.

* :class:`FakeCortex` runs the real Snowflake connector API on DuckDB through ``fakesnow`` and emulates
  ``AI_COMPLETE`` and ``SNOWFLAKE.CORTEX.TRY_COMPLETE`` with a DuckDB Python UDF (macros give the named
  arguments and the three-part name): deterministic answers with usage, per-row errors for chosen prompts, a
  count of model calls, and an optional abort after N calls (a statement killed half way).

  It also models what the Snowflake documentation says of sessions and asynchronous queries, which fakesnow
  does not: every connection is a session (``CURRENT_SESSION()``, ``ALTER SESSION SET QUERY_TAG``), every
  statement gets a query id and a row in its session's query history
  (``INFORMATION_SCHEMA.QUERY_HISTORY_BY_SESSION``: the session's most recent ``RESULT_LIMIT`` queries,
  running ones included, with ``QUERY_TAG``, ``QUERY_TYPE`` and ``EXECUTION_STATUS``), and
  ``get_query_status`` answers from that registry. With ``background=True`` an asynchronous statement
  (``execute_async``) really runs in a thread of its own, on its own connection: it is ``RUNNING`` for status
  queries while it runs and outlives the client and the connection that submitted it; ``SYSTEM$CANCEL_QUERY``
  aborts it (its rows roll back). :meth:`FakeCortex.hold` keeps such statements running until
  :meth:`FakeCortex.release`; :meth:`FakeCortex.fail_next` makes the next statement matching a pattern raise
  (a :class:`SimulatedKill` is a worker dying there); ``status_failures`` makes status polls fail.
* :class:`FakeSqlApi` is an HTTP server on 127.0.0.1 answering the SQL API's statement status and cancel
  calls (running for a few polls, then success, or a 422 error), recording the auth headers it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock


def _answer(prompt: str) -> str:
    return f"Cortex answer to: {prompt[:60]}"


class SimulatedKill(BaseException):  # noqa: N818  (named for what it simulates, like KeyboardInterrupt)
    """The worker process dies here: a ``BaseException``, so no ``except Exception`` in the task catches it."""


@dataclass
class FakeQuery:
    """One statement as the fake account keeps it (the query history's row and the status it reports)."""

    query_id: str
    session_id: str
    query_tag: str | None
    text: str
    query_type: str
    status: str = "RUNNING"
    error: str = ""
    cancelled: bool = False
    start_time: float = field(default_factory=time.time)
    thread: threading.Thread | None = None

    @property
    def execution_status(self) -> str:
        """``EXECUTION_STATUS`` as the query history shows it (a cancelled query failed with an error)."""
        return "FAILED_WITH_ERROR" if self.status == "ABORTED" else self.status


@dataclass
class _Session:
    session_id: str
    query_tag: str | None


_QUERY_TAG_RE = re.compile(r"^\s*ALTER\s+SESSION\s+(?:SET\s+QUERY_TAG\s*=\s*'(?P<tag>.*)'|UNSET\s+QUERY_TAG)\s*;?\s*$",
                           re.IGNORECASE | re.DOTALL)


def _query_type(sql: str) -> str:
    words = sql.split(None, 2)
    head = words[0].upper() if words else ""
    if head == "ALTER" and len(words) > 1 and words[1].upper() == "SESSION":
        return "ALTER_SESSION"
    return head


@dataclass
class FakeCortex:
    """fakesnow with Cortex functions and Snowflake's session and query model. Use as a context manager;
    connect with ``database``/``schema``.

    :param database: the database the connection uses (macros are created there).
    :param schema: the schema the connection uses.
    :param fail_marker: prompts (or conversations) containing this text get a per-row error.
    :param abort_after: raise inside the UDF on model call number ``abort_after + 1`` (the statement fails,
        rolling back its chunk), once, simulating a kill in the middle of a run.
    :param default_status: a ``QueryStatus`` name reported for every statement not in ``statuses`` (e.g.
        ``RUNNING`` to keep them "running" forever); default: what the statement really did.
    :param background: run asynchronous statements in threads of their own (see the module docstring);
        ``False`` runs them at submit, as fakesnow does, still giving each a query id and a history row.
    :param status_failures: how many of the next status polls (``get_query_status``) raise a network error.
    """

    database: str = "SYNTH_DB"
    schema: str = "PUBLIC"
    fail_marker: str = "[fail]"
    abort_after: int | None = None
    default_status: str | None = None
    background: bool = False
    status_failures: int = 0
    calls: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    queries: dict[str, FakeQuery] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _faults: list[tuple[re.Pattern[str], BaseException]] = field(default_factory=list)
    _sessions: weakref.WeakKeyDictionary[Any, _Session] = field(default_factory=weakref.WeakKeyDictionary)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _open: threading.Event = field(default_factory=threading.Event)
    _local: threading.local = field(default_factory=threading.local)

    def __post_init__(self) -> None:
        self._open.set()

    # -- what tests steer -----------------------------------------------------------------------------------

    def hold(self) -> None:
        """Statements running in the background wait before their first model call until :meth:`release`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def fail_next(self, pattern: str, error: BaseException) -> None:
        """The next statement (sync or async) whose SQL matches ``pattern`` raises ``error`` instead of running."""
        with self._lock:
            self._faults.append((re.compile(pattern, re.IGNORECASE | re.DOTALL), error))

    def wait_held(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` background statements are inside their first model call, held (they have read
        the tables they answer from: what they will insert is decided)."""
        deadline = time.monotonic() + timeout
        while len(self.held) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.held)} of {count} statements held after {timeout} s")
            time.sleep(0.01)

    def running(self) -> list[str]:
        """Query ids of the statements running now."""
        return [q.query_id for q in list(self.queries.values()) if q.status == "RUNNING"]

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until every background statement finished."""
        deadline = time.monotonic() + timeout
        for q in list(self.queries.values()):
            if q.thread is not None:
                q.thread.join(max(0.0, deadline - time.monotonic()))
                if q.thread.is_alive():
                    raise TimeoutError(f"statement {q.query_id} still running after {timeout} s")

    # -- the model ------------------------------------------------------------------------------------------

    def _call(self, text: str) -> None:
        q: FakeQuery | None = getattr(self._local, "query", None)
        if q is not None and q.thread is not None:
            while not self._open.wait(0.02):
                self.held.add(q.query_id)
                if q.cancelled:
                    break
            if q.cancelled:
                raise RuntimeError("SQL execution canceled")
        with self._lock:
            if self.abort_after is not None and len(self.calls) >= self.abort_after:
                self.abort_after = None  # one kill; the next try runs normally
                raise RuntimeError("simulated kill: the statement was aborted")
            self.calls.append(text)

    def _details(self, model: str, text: str, fmt: Any) -> dict[str, Any]:
        answer: Any = _answer(text)
        if fmt:
            answer = json.dumps({"answer": answer})
        words = len(text.split())
        return {"choices": [{"messages": answer}], "created": 1_700_000_000, "model": model,
                "usage": {"prompt_tokens": words, "completion_tokens": 5, "total_tokens": words + 5}}

    def ai_complete(self, model: str, prompt: str, params: Any, fmt: Any, details: bool, errors: bool) -> str:
        self._call(prompt)
        if self.fail_marker in (prompt or ""):
            if not errors:
                return json.dumps(None)
            return json.dumps({"value": None, "error": f"Cortex error: request rejected for prompt {prompt[:20]!r}"})
        value = self._details(model, prompt, fmt)
        return json.dumps({"value": value, "error": None} if errors else value)

    def try_complete(self, model: str, conversation: Any, options: Any) -> str | None:
        turns = json.loads(conversation) if isinstance(conversation, str) else conversation
        text = " | ".join(str(t.get("content", "")) for t in turns if t.get("role") != "assistant")
        self._call(text)
        if self.fail_marker in text:
            return None
        fmt = json.loads(options).get("response_format") if isinstance(options, str) else None
        return json.dumps(self._details(model, text, fmt))

    def _install(self, fs: Any) -> None:
        duck = fs.duck_conn
        if self.background:
            # one DuckDB thread per query: a UDF call then runs in the thread of the statement it belongs to
            duck.execute("SET threads = 1")
        duck.create_function("_synth_ai_complete", self.ai_complete,
                             ["VARCHAR", "VARCHAR", "JSON", "JSON", "BOOLEAN", "BOOLEAN"], "JSON",
                             null_handling="special", side_effects=True)
        duck.create_function("_synth_try_complete", self.try_complete, ["VARCHAR", "JSON", "JSON"], "JSON",
                             null_handling="special", side_effects=True)
        duck.create_function("_synth_cancel", self._cancel, ["VARCHAR"], "VARCHAR", side_effects=True)
        conn = fs.connect(database=self.database, schema=self.schema)
        cur = conn.cursor()
        cur.execute("CREATE DATABASE IF NOT EXISTS SNOWFLAKE")
        cur.execute("CREATE SCHEMA IF NOT EXISTS SNOWFLAKE.CORTEX")
        where = f"{self.database}.{self.schema}"
        duck.execute(f"CREATE MACRO {where}.ai_complete(model, prompt, model_parameters := NULL, "
                     "response_format := NULL, show_details := FALSE, return_error_details := FALSE) AS "
                     "_synth_ai_complete(model, prompt, model_parameters, response_format, show_details, "
                     "return_error_details)")
        duck.execute("CREATE MACRO snowflake.cortex.try_complete(model, conversation, options) AS "
                     "_synth_try_complete(model, conversation, options)")
        duck.execute(f'CREATE MACRO {where}."system$cancel_query"(q) AS _synth_cancel(q)')
        conn.close()

    def _cancel(self, query_id: str) -> str:
        self.cancelled.append(query_id)
        q = self.queries.get(query_id)
        if q is not None and q.status == "RUNNING":
            q.cancelled = True
            return f"query [{query_id}] terminated."
        return f"Identified SQL statement is not currently executing: {query_id}"

    # -- sessions, statements and their history ---------------------------------------------------------------

    def _connect(self, *args: Any, **kwargs: Any) -> Any:
        conn = self._fs.connect(*args, **kwargs)
        tag = (kwargs.get("session_parameters") or {}).get("QUERY_TAG")
        self._sessions[conn] = _Session(str(1_000_000 + next(self._ids)), tag)
        return conn

    def _session(self, conn: Any) -> _Session:
        with self._lock:
            if conn not in self._sessions:
                self._sessions[conn] = _Session(str(1_000_000 + next(self._ids)), None)
            return self._sessions[conn]

    def _register(self, conn: Any, sql: str) -> FakeQuery:
        session = self._session(conn)
        with self._lock:
            for i, (pattern, error) in enumerate(self._faults):
                if pattern.search(sql):
                    del self._faults[i]
                    raise error
            q = FakeQuery(f"01fa{next(self._ids):012x}-0000-{session.session_id}", session.session_id,
                          session.query_tag, sql, _query_type(sql))
            self.queries[q.query_id] = q
        return q

    def _history(self, conn: Any, params: Any) -> tuple[str, list[Any]]:
        """``QUERY_HISTORY_BY_SESSION(SESSION_ID => ?, RESULT_LIMIT => ?)`` filtered ``CONTAINS(QUERY_TAG, ?)``,
        as rows ``(QUERY_ID, QUERY_TAG, EXECUTION_STATUS, ERROR_MESSAGE, QUERY_TYPE, LEFT(QUERY_TEXT, 20))``. An
        ``ALTER SESSION SET QUERY_TAG`` is recorded with the tag in effect before it (the documentation does
        not say which; this is the case a lookup must tell apart)."""
        session_id, limit, marker = (str(params[0]), int(params[1]), str(params[2]))
        mine = [q for q in list(self.queries.values()) if q.session_id == session_id]
        recent = sorted(mine, key=lambda q: q.start_time)[-limit:]
        rows = [(q.query_id, q.query_tag, q.execution_status, q.error or None, q.query_type, q.text[:20])
                for q in recent if marker in (q.query_tag or "")]
        mark = "?" if conn._paramstyle == "qmark" else "%s"
        if not rows:
            return ("SELECT NULL AS QUERY_ID, NULL AS QUERY_TAG, NULL AS EXECUTION_STATUS, NULL AS ERROR_MESSAGE, "
                    "NULL AS QUERY_TYPE, NULL AS QUERY_TEXT WHERE 1 = 0"), []
        one = "SELECT " + ", ".join([mark] * 6)
        return " UNION ALL ".join([one] * len(rows)), [v for row in rows for v in row]

    def _system(self, cursor: Any, sql: str, params: Any) -> tuple[str, Any] | None:
        """What the fake answers itself (fakesnow has no sessions): ``(sql, params)`` to run instead."""
        conn = cursor._conn
        if match := _QUERY_TAG_RE.match(sql):
            tag = match.group("tag")
            self._session(conn).query_tag = None if tag is None else re.sub(r"\\(.)", r"\1", tag)
            return "SELECT 'Statement executed successfully.' AS STATUS", None
        if re.fullmatch(r"\s*SELECT\s+CURRENT_SESSION\(\)\s*", sql, re.IGNORECASE):
            return f"SELECT '{self._session(conn).session_id}' AS SESSION_ID", None
        if "QUERY_HISTORY_BY_SESSION" in sql.upper():
            return self._history(conn, params)
        return None

    def _run(self, q: FakeQuery, conn: Any, sql: str, params: Any, *, background: bool) -> None:
        """Run a statement on a connection of its own (the server's side: the client's may close)."""
        own = self._fs.connect(database=conn.database, schema=conn.schema, paramstyle=conn._paramstyle)
        self._local.query = q
        try:
            self._original_execute(own.cursor(), sql, params)
            q.status = "ABORTED" if q.cancelled else "SUCCESS"
        except Exception as exc:
            q.status, q.error = ("ABORTED" if q.cancelled else "FAILED_WITH_ERROR"), str(exc)
            if not background:
                raise
        finally:
            self._local.query = None
            own.close()

    def _execute_async(self, cursor: Any, command: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        q = self._register(cursor._conn, command)
        if self.background:
            q.thread = threading.Thread(target=self._run, args=(q, cursor._conn, command, params),
                                        kwargs={"background": True}, name=f"fake-snowflake-{q.query_id}",
                                        daemon=True)
            q.thread.start()
        else:
            self._run(q, cursor._conn, command, params, background=False)
        cursor._sfqid = q.query_id
        return cursor

    def _execute(self, cursor: Any, command: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        q = self._register(cursor._conn, command)
        replaced = self._system(cursor, command, params)
        try:
            if replaced is not None:
                result = self._original_execute(cursor, replaced[0], replaced[1])
            else:
                result = self._original_execute(cursor, command, params, *args, **kwargs)
        except Exception as exc:
            q.status, q.error = "FAILED_WITH_ERROR", str(exc)
            raise
        q.status = "SUCCESS"
        return result

    def _status(self, query_id: str) -> Any:
        import snowflake.connector
        from snowflake.connector.constants import QueryStatus

        with self._lock:
            if self.status_failures > 0:
                self.status_failures -= 1
                raise snowflake.connector.errors.OperationalError(msg="simulated: status request failed (connection "
                                                                      "reset)", errno=250003)
        if query_id in self.statuses:
            return QueryStatus[self.statuses[query_id]]
        if self.default_status is not None:
            return QueryStatus[self.default_status]
        if query_id in self.queries:
            return QueryStatus[self.queries[query_id].status]
        return QueryStatus.SUCCESS if query_id in self._fs.results_cache else QueryStatus.FAILED_WITH_ERROR

    def __enter__(self) -> FakeCortex:
        import snowflake.connector
        from fakesnow import fakes  # type: ignore[attr-defined]
        from fakesnow.conn import FakeSnowflakeConnection
        from fakesnow.cursor import FakeSnowflakeCursor
        from fakesnow.instance import FakeSnow
        from snowflake.connector.constants import QueryStatus

        fs = FakeSnow()
        self._fs = fs
        self._original_execute = FakeSnowflakeCursor.execute
        fake = self

        def execute(cursor: Any, command: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
            return fake._execute(cursor, command, params, *args, **kwargs)

        def execute_async(cursor: Any, command: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
            return fake._execute_async(cursor, command, params, *args, **kwargs)

        def status(conn: Any, query_id: str) -> QueryStatus:
            status: QueryStatus = fake._status(query_id)
            return status

        def status_or_raise(conn: Any, query_id: str) -> QueryStatus:
            result: QueryStatus = fake._status(query_id)
            if result.name in ("FAILED_WITH_ERROR", "ABORTED"):
                q = fake.queries.get(query_id)
                message = q.error if q is not None and q.error else f"statement {query_id} failed"
                raise snowflake.connector.errors.ProgrammingError(msg=message, errno=1)
            return result

        self._stack.enter_context(mock.patch("snowflake.connector.connect", side_effect=self._connect))
        self._stack.enter_context(mock.patch("snowflake.connector.pandas_tools.write_pandas",
                                             side_effect=fakes.write_pandas))
        self._stack.enter_context(mock.patch.object(FakeSnowflakeCursor, "execute", execute))
        self._stack.enter_context(mock.patch.object(FakeSnowflakeCursor, "execute_async", execute_async))
        self._stack.enter_context(mock.patch.object(FakeSnowflakeConnection, "get_query_status", status,
                                                    create=True))
        self._stack.enter_context(mock.patch.object(FakeSnowflakeConnection, "get_query_status_throw_if_error",
                                                    status_or_raise, create=True))
        self._stack.callback(fs.duck_conn.close)
        self._stack.callback(self._stop_statements)
        self._install(fs)
        return self

    def _stop_statements(self) -> None:
        self.release()
        with contextlib.suppress(TimeoutError):
            self.wait_idle(10)

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run SQL on the fake account (for assertions)."""
        conn = self._fs.connect(database=self.database, schema=self.schema)
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return [tuple(row) for row in cur.fetchall()]
        finally:
            conn.close()


@dataclass
class FakeSqlApi:
    """The SQL API's ``/api/v2/statements/{handle}`` (GET status, POST cancel) on 127.0.0.1, in a thread.

    :param running_polls: how many GETs of a handle answer 202 (running) before the final answer.
    :param errors: handle -> message: the final answer is a 422 with that message.
    :param account: a :class:`FakeCortex` whose statements this API reports: 202 while one runs (at least
        ``running_polls`` times), then 200, or 422 with its error; a cancel aborts it. Handles it does not
        know are answered as without it.
    """

    running_polls: int = 1
    account: FakeCortex | None = None
    errors: dict[str, str] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    token_types: list[str] = field(default_factory=list)
    port: int = 0

    async def _status(self, request: Any) -> Any:
        from aiohttp import web

        handle = request.match_info["handle"]
        self.auth_headers.append(request.headers.get("Authorization", ""))
        self.token_types.append(request.headers.get("X-Snowflake-Authorization-Token-Type", ""))
        n = self.polls[handle] = self.polls.get(handle, 0) + 1
        q = self.account.queries.get(handle) if self.account is not None else None
        if q is not None and q.status != "RUNNING" and n > self.running_polls:
            if q.status == "SUCCESS":
                return web.json_response({"code": "090001", "message": "Statement executed successfully.",
                                          "statementHandle": handle, "data": [["1"]]}, status=200)
            return web.json_response({"code": "100132", "message": q.error or q.status, "sqlState": "P0000",
                                      "statementHandle": handle}, status=422)
        if q is not None:
            n = min(n, self.running_polls)  # still running (or not polled often enough yet): 202
        if handle in self.cancelled:
            return web.json_response({"code": "000604", "message": "SQL execution canceled", "sqlState": "57014",
                                      "statementHandle": handle}, status=422)
        if n <= self.running_polls:
            return web.json_response({"code": "333334", "message": "Asynchronous execution in progress.",
                                      "statementHandle": handle,
                                      "statementStatusUrl": f"/api/v2/statements/{handle}"}, status=202)
        if handle in self.errors:
            return web.json_response({"code": "100132", "message": self.errors[handle], "sqlState": "P0000",
                                      "statementHandle": handle}, status=422)
        return web.json_response({"code": "090001", "message": "Statement executed successfully.",
                                  "statementHandle": handle, "data": [["1"]]}, status=200)

    async def _cancel(self, request: Any) -> Any:
        from aiohttp import web

        handle = request.match_info["handle"]
        self.cancelled.append(handle)
        if self.account is not None:
            self.account._cancel(handle)
        return web.json_response({"code": "000604", "message": "successfully canceled", "statementHandle": handle})

    @contextlib.contextmanager
    def serve(self) -> Iterator[FakeSqlApi]:
        """Serve in a background thread until the block ends; ``port`` is set inside the block."""
        from aiohttp import web

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        app = web.Application()
        app.router.add_get("/api/v2/statements/{handle}", self._status)
        app.router.add_post("/api/v2/statements/{handle}/cancel", self._cancel)
        runner = web.AppRunner(app)

        async def start() -> int:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        # the server's loop runs in its own thread, so tests may start it from inside an event loop
        self.port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
