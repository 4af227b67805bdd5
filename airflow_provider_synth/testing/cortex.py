"""Fakes for Snowflake Cortex, for tests and local runs without an account.

* :class:`FakeCortex` runs the real Snowflake connector API on DuckDB through ``fakesnow`` and emulates
  ``AI_COMPLETE`` and ``SNOWFLAKE.CORTEX.TRY_COMPLETE`` with a DuckDB Python UDF (macros give the named
  arguments and the three-part name): deterministic answers with usage, per-row errors for chosen prompts, a
  count of model calls, and an optional abort after N calls (a statement killed half way). fakesnow has no
  ``get_query_status``: the fake answers SUCCESS for every statement it ran, or what a test sets.
* :class:`FakeSqlApi` is an HTTP server on 127.0.0.1 answering the SQL API's statement status and cancel
  calls (running for a few polls, then success, or a 422 error), recording the auth headers it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock


def _answer(prompt: str) -> str:
    return f"Cortex answer to: {prompt[:60]}"


@dataclass
class FakeCortex:
    """fakesnow with Cortex functions. Use as a context manager; connect with ``database``/``schema``.

    :param database: the database the connection uses (macros are created there).
    :param schema: the schema the connection uses.
    :param fail_marker: prompts (or conversations) containing this text get a per-row error.
    :param abort_after: raise inside the UDF on model call number ``abort_after + 1`` (the statement fails,
        rolling back its chunk), once, simulating a kill in the middle of a run.
    :param default_status: a ``QueryStatus`` name reported for every statement not in ``statuses`` (e.g.
        ``RUNNING`` to keep them "running" forever); default: SUCCESS for every statement that ran.
    """

    database: str = "SYNTH_DB"
    schema: str = "PUBLIC"
    fail_marker: str = "[fail]"
    abort_after: int | None = None
    default_status: str | None = None
    calls: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def _call(self, text: str) -> None:
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
        return f"Identified SQL statement is not currently executing: {query_id}"

    def __enter__(self) -> FakeCortex:
        import snowflake.connector
        from fakesnow import fakes  # type: ignore[attr-defined]
        from fakesnow.conn import FakeSnowflakeConnection
        from fakesnow.instance import FakeSnow
        from snowflake.connector.constants import QueryStatus

        fs = FakeSnow()
        self._fs = fs

        def status(conn: Any, query_id: str) -> QueryStatus:
            if query_id in self.statuses:
                return QueryStatus[self.statuses[query_id]]
            if self.default_status is not None:
                return QueryStatus[self.default_status]
            return QueryStatus.SUCCESS if query_id in fs.results_cache else QueryStatus.FAILED_WITH_ERROR

        def status_or_raise(conn: Any, query_id: str) -> QueryStatus:
            result = status(conn, query_id)
            if result.name in ("FAILED_WITH_ERROR", "ABORTED"):
                raise snowflake.connector.errors.ProgrammingError(msg=f"statement {query_id} failed", errno=1)
            return result

        self._stack.enter_context(mock.patch("snowflake.connector.connect", side_effect=fs.connect))
        self._stack.enter_context(mock.patch("snowflake.connector.pandas_tools.write_pandas",
                                             side_effect=fakes.write_pandas))
        self._stack.enter_context(mock.patch.object(FakeSnowflakeConnection, "get_query_status", status,
                                                    create=True))
        self._stack.enter_context(mock.patch.object(FakeSnowflakeConnection, "get_query_status_throw_if_error",
                                                    status_or_raise, create=True))
        self._stack.callback(fs.duck_conn.close)
        self._install(fs)
        return self

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
    """

    running_polls: int = 1
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
