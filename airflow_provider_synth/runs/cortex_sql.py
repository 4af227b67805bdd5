"""The SQL of a Cortex batch run (its staging tables and source tables), as ``(text, params)`` pairs for the
connector's ``qmark`` binding; the hook's own calls (session, query tag, history, cancel) and identifier
quoting live with the hook (:mod:`~airflow_provider_synth.hooks.cortex`).

Values (model names, ids, prompts, ranges, query ids) are always bind parameters, never spliced into the
text. Identifiers (database, schema, table, column names) cannot be bound: ``quote_ident`` accepts a plain
Snowflake identifier (upper-cased, as Snowflake resolves it unquoted) or a double-quoted one (case kept), and
always emits it double-quoted with inner quotes doubled, so no name can close the quote and inject SQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_synth.batch import keys
from airflow_provider_synth.hooks.cortex import (
    Statement,
    cancel_query,
    current_session,
    history_of_session,
    qualified,
    quote_ident,
    set_query_tag,
    string_literal,
)


def split_name(name: str) -> list[str]:
    """Split ``db.schema.table`` into parts, honouring double quotes (``"a.b".c`` has two parts)."""
    parts, buf, quoted, i = [], "", False, 0
    while i < len(name):
        ch = name[i]
        if ch == '"':
            if quoted and name[i + 1 : i + 2] == '"':
                buf += '""'
                i += 2
                continue
            quoted = not quoted
            buf += ch
        elif ch == "." and not quoted:
            parts.append(buf)
            buf = ""
        else:
            buf += ch
        i += 1
    if quoted:
        raise ValueError(f"unbalanced double quote in {name!r}")
    parts.append(buf)
    if len(parts) > 3 or any(not p for p in parts):
        raise ValueError(f"{name!r} is not a valid [database.][schema.]name")
    return parts


def table_ref(name: str) -> str:
    """Quote a user-given ``[db.][schema.]table`` name."""
    return ".".join(quote_ident(p) for p in split_name(name))


def run_key(*parts: Any) -> str:
    """A short stable key (16 hex digits) for a run's staging tables."""
    return keys.run_key(*parts, sep="\x1f", length=16).upper()


#: Every staging table this provider creates carries a COMMENT starting with this; clean-up drops no other table.
STAGING_COMMENT = "airflow-provider-synth cortex staging"
#: The three tables of a run, by suffix.
TABLE_SUFFIXES = ("REQUESTS", "RESULTS", "STATEMENTS")


@dataclass(frozen=True)
class StagingTables:
    """The three tables of one run: the requests (keyed by custom_id, with their input order ``SEQ``), the
    answers, and the statements submitted (so a retried task re-attaches instead of paying twice).

    :param database: staging database (``None``: the connection's).
    :param schema: staging schema (``None``: the connection's).
    :param prefix: table name prefix, e.g. ``SYNTH_CORTEX_<key>``.
    """

    database: str | None
    schema: str | None
    prefix: str

    def _name(self, suffix: str) -> str:
        return qualified(self.database, self.schema, f"{self.prefix}_{suffix}")

    @property
    def requests(self) -> str:
        return self._name("REQUESTS")

    @property
    def results(self) -> str:
        return self._name("RESULTS")

    @property
    def statements(self) -> str:
        return self._name("STATEMENTS")

    def plain_names(self) -> tuple[str | None, str | None, str]:
        """``(database, schema, table)`` of the requests table as the connector's bulk writer takes them."""

        def plain(p: str | None) -> str | None:
            return None if p is None else quote_ident(p)[1:-1].replace('""', '"')

        return plain(self.database), plain(self.schema), f"{self.prefix}_REQUESTS".upper()

    def create(self, comment: str = STAGING_COMMENT) -> list[Statement]:
        """``CREATE TRANSIENT TABLE IF NOT EXISTS`` for the three tables (transient: no fail-safe cost), each
        with ``comment`` (which must start with :data:`STAGING_COMMENT`: clean-up matches it). The statements
        table gains the intent columns if an earlier version created it without them."""
        if not comment.startswith(STAGING_COMMENT):
            raise ValueError(f"a staging table comment must start with {STAGING_COMMENT!r}")
        note = f"COMMENT = {string_literal(comment)}"
        return [
            (f"CREATE TRANSIENT TABLE IF NOT EXISTS {self.requests} (CUSTOM_ID VARCHAR NOT NULL, "
             "SEQ NUMBER(38,0) NOT NULL, PROMPT VARCHAR, CONVERSATION VARCHAR, MODEL_PARAMETERS VARCHAR, "
             f"RESPONSE_FORMAT VARCHAR) {note}", ()),
            (f"CREATE TRANSIENT TABLE IF NOT EXISTS {self.results} (CUSTOM_ID VARCHAR NOT NULL, "
             f"SEQ NUMBER(38,0), OUTPUT VARCHAR, ANSWERED_AT TIMESTAMP_NTZ) {note}", ()),
            (f"CREATE TRANSIENT TABLE IF NOT EXISTS {self.statements} (CHUNK NUMBER(38,0), "
             "QUERY_ID VARCHAR, TRY_NUMBER NUMBER(38,0), SUBMITTED_AT NUMBER(20,3), INTENT VARCHAR, "
             f"SESSION_ID VARCHAR, QUERY_TAG VARCHAR) {note}", ()),
            *[(f"ALTER TABLE {self.statements} ADD COLUMN IF NOT EXISTS {col} VARCHAR", ())
              for col in ("INTENT", "SESSION_ID", "QUERY_TAG")],
        ]

    def drop(self, suffixes: Sequence[str] = TABLE_SUFFIXES) -> list[Statement]:
        """``DROP TABLE IF EXISTS`` for the run's tables (only those of ``suffixes``)."""
        return [(f"DROP TABLE IF EXISTS {self._name(s)}", ()) for s in TABLE_SUFFIXES if s in suffixes]

    def count_requests(self) -> Statement:
        return (f"SELECT COUNT(*) FROM {self.requests}", ())

    def truncate_requests(self) -> Statement:
        return (f"TRUNCATE TABLE {self.requests}", ())

    def pending_chunks(self, chunk_size: int) -> Statement:
        """Chunks (``(SEQ - 1) / chunk_size``) that still hold requests without an answer, with their counts."""
        return (
            f"SELECT FLOOR((s.SEQ - 1) / ?) AS CHUNK, COUNT(*) AS N FROM {self.requests} s "
            f"WHERE NOT EXISTS (SELECT 1 FROM {self.results} r WHERE r.CUSTOM_ID = s.CUSTOM_ID) "
            "GROUP BY 1 ORDER BY 1",
            (chunk_size,),
        )

    def complete_chunk(self, model: str, chunk: int, chunk_size: int) -> Statement:
        """The one set-based statement that answers a chunk: every request of the id range that has no answer
        yet goes through Cortex, and its answer or per-row error is inserted. Rows already answered are skipped
        by ``NOT EXISTS``, so re-running a chunk never pays twice.

        The three call shapes (conversation, prompt with a JSON schema, plain prompt) are three filtered
        ``SELECT``s under one ``UNION ALL``, not branches of a ``CASE``: a filter is applied before the model is
        called, while neither engine promises to skip the ``CASE`` branches a row does not take. ``OUTPUT``
        holds each call's result as JSON text: ``AI_COMPLETE``'s ``{"value", "error"}`` object, or
        ``TRY_COMPLETE``'s answer (NULL when the call failed)."""
        lo, hi = chunk * chunk_size + 1, (chunk + 1) * chunk_size
        pending = (f"FROM {self.requests} s WHERE s.SEQ BETWEEN ? AND ? "
                   f"AND NOT EXISTS (SELECT 1 FROM {self.results} r WHERE r.CUSTOM_ID = s.CUSTOM_ID)")
        details = "show_details => TRUE, return_error_details => TRUE"
        params = "model_parameters => PARSE_JSON(s.MODEL_PARAMETERS)"
        sql = (
            f"INSERT INTO {self.results} (CUSTOM_ID, SEQ, OUTPUT, ANSWERED_AT) "
            "SELECT s.CUSTOM_ID, s.SEQ, TO_VARCHAR(SNOWFLAKE.CORTEX.TRY_COMPLETE(?, PARSE_JSON(s.CONVERSATION), "
            f"PARSE_JSON(s.MODEL_PARAMETERS))), CURRENT_TIMESTAMP() {pending} AND s.CONVERSATION IS NOT NULL "
            f"UNION ALL SELECT s.CUSTOM_ID, s.SEQ, TO_JSON(AI_COMPLETE(model => ?, prompt => s.PROMPT, {params}, "
            f"response_format => PARSE_JSON(s.RESPONSE_FORMAT), {details})), CURRENT_TIMESTAMP() {pending} "
            "AND s.CONVERSATION IS NULL AND s.RESPONSE_FORMAT IS NOT NULL "
            f"UNION ALL SELECT s.CUSTOM_ID, s.SEQ, TO_JSON(AI_COMPLETE(model => ?, prompt => s.PROMPT, {params}, "
            f"{details})), CURRENT_TIMESTAMP() {pending} AND s.CONVERSATION IS NULL AND s.RESPONSE_FORMAT IS NULL"
        )
        return sql, (model, lo, hi) * 3

    def record_intent(self, chunk: int, intent: str, try_number: int, submitted_at: float, session_id: str,
                      query_tag: str) -> Statement:
        """Write down a chunk's statement BEFORE it is submitted: the intent token (also in the statement's
        query tag), the session that will submit it, and the time (epoch seconds; the run's deadline is anchored
        at the first one). A retry that finds an intent with no query id looks the statement up in that
        session's query history (:meth:`history_of_session`)."""
        return (
            f"INSERT INTO {self.statements} (CHUNK, QUERY_ID, TRY_NUMBER, SUBMITTED_AT, INTENT, SESSION_ID, "
            "QUERY_TAG) SELECT ?, NULL, ?, ?, ?, ?, ?",
            (chunk, try_number, round(submitted_at, 3), intent, session_id, query_tag),
        )

    def record_query_id(self, intent: str, query_id: str) -> Statement:
        """Attach the query id Snowflake gave the statement of an intent."""
        return (f"UPDATE {self.statements} SET QUERY_ID = ? WHERE INTENT = ? AND QUERY_ID IS NULL",
                (query_id, intent))

    def forget_intent(self, intent: str) -> Statement:
        """Drop an intent whose statement never reached Snowflake (not in its session's history once settled)."""
        return (f"DELETE FROM {self.statements} WHERE INTENT = ? AND QUERY_ID IS NULL", (intent,))

    def open_intents(self) -> Statement:
        """``(intent, chunk, session_id, submitted_at)`` of every intent without a query id yet, oldest first."""
        return (f"SELECT INTENT, CHUNK, SESSION_ID, SUBMITTED_AT FROM {self.statements} WHERE QUERY_ID IS NULL "
                "ORDER BY SUBMITTED_AT, CHUNK", ())

    def recorded_statements(self) -> Statement:
        """``(chunk, query_id, submitted_at)`` of every statement submitted so far, oldest first."""
        return (f"SELECT CHUNK, QUERY_ID, SUBMITTED_AT FROM {self.statements} WHERE QUERY_ID IS NOT NULL "
                "ORDER BY SUBMITTED_AT, CHUNK", ())

    def first_submission(self) -> Statement:
        """The run's first submission time (epoch seconds; NULL before any): the deadline's anchor."""
        return (f"SELECT MIN(SUBMITTED_AT) FROM {self.statements}", ())

    def read_back(self) -> Statement:
        """Every request in input order with ONE answer (NULLs for a request not answered yet). Should two
        statements ever answer the same row, the first written is kept (earliest ``ANSWERED_AT``; ties broken
        by the answer's text, so every read-back keeps the same one): see :meth:`count_answered_twice`."""
        return (
            f"SELECT s.CUSTOM_ID, r.CUSTOM_ID IS NOT NULL AS ANSWERED, r.OUTPUT FROM {self.requests} s "
            f"LEFT JOIN (SELECT CUSTOM_ID, OUTPUT FROM {self.results} QUALIFY ROW_NUMBER() OVER "
            "(PARTITION BY CUSTOM_ID ORDER BY ANSWERED_AT, OUTPUT) = 1) r ON r.CUSTOM_ID = s.CUSTOM_ID "
            "ORDER BY s.SEQ",
            (),
        )

    def count_answered_twice(self) -> Statement:
        """How many answers beyond the first the results table holds (rows answered by two statements)."""
        return (f"SELECT COUNT(*) - COUNT(DISTINCT CUSTOM_ID) FROM {self.results}", ())


def staging_tables_listing(database: str | None, schema: str | None, table_prefix: str) -> Statement:
    """``(schema, table, comment)`` of the tables that look like this provider's staging tables: named
    ``<table_prefix>_<16 hex>_<suffix>`` and commented :data:`STAGING_COMMENT`."""
    info = qualified(database, "INFORMATION_SCHEMA") if database else "INFORMATION_SCHEMA"
    sql = (f"SELECT TABLE_SCHEMA, TABLE_NAME, COMMENT FROM {info}.TABLES WHERE STARTSWITH(TABLE_NAME, ?) "
           "AND STARTSWITH(COMMENT, ?)")
    params: tuple[Any, ...] = (quote_ident(table_prefix)[1:-1] + "_", STAGING_COMMENT)
    if schema:
        sql += " AND TABLE_SCHEMA = ?"
        params += (quote_ident(schema)[1:-1],)
    return sql + " ORDER BY TABLE_SCHEMA, TABLE_NAME", params


@dataclass(frozen=True)
class TableSource:
    """An existing table of prompts or conversations, staged server-side (no row leaves Snowflake).

    :param table: ``[db.][schema.]table``.
    :param id_column: a column whose values are unique; becomes the custom_id (as text).
    :param prompt_column: a text column of single prompts (``AI_COMPLETE``), or
    :param messages_column: an ARRAY/VARIANT column of ``[{role, content}]`` conversations.
    :param params: OpenAI chat parameters applied to every row (``temperature``, ``top_p``, ``max_tokens``,
        ``response_format``), mapped like a request body's.
    """

    table: str
    id_column: str
    prompt_column: str | None = None
    messages_column: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.prompt_column is None) == (self.messages_column is None):
            raise ValueError("set exactly one of prompt_column and messages_column")
        for name in (self.id_column, self.prompt_column or self.messages_column or ""):
            quote_ident(name)
        table_ref(self.table)

    @property
    def _input(self) -> str:
        return quote_ident(self.prompt_column or self.messages_column or "")

    def checks(self) -> tuple[Statement, Statement]:
        """Counts (rows, NULL ids, NULL/empty inputs) and a few duplicated ids: run before anything is paid for."""
        src, idc, inp = table_ref(self.table), quote_ident(self.id_column), self._input
        empty = f"{inp} IS NULL" + (f" OR TRIM({inp}) = ''" if self.prompt_column else "")
        counts = (f"SELECT COUNT(*), COUNT(*) - COUNT({idc}), COUNT_IF({empty}) FROM {src}", ())
        dups = (f"SELECT {idc}, COUNT(*) FROM {src} WHERE {idc} IS NOT NULL GROUP BY {idc} "
                f"HAVING COUNT(*) > 1 ORDER BY {idc} LIMIT 20", ())
        return counts, dups

    def stage(self, tables: StagingTables, model_parameters: str, response_format: str | None) -> Statement:
        """``INSERT ... SELECT`` of the source into the requests table, ordered by id."""
        src, idc, inp = table_ref(self.table), quote_ident(self.id_column), self._input
        if self.prompt_column:
            prompt, conv = f"TO_VARCHAR(t.{inp})", "NULL"
        else:
            prompt, conv = "NULL", f"TO_JSON(t.{inp})"
        return (
            f"INSERT INTO {tables.requests} (CUSTOM_ID, SEQ, PROMPT, CONVERSATION, MODEL_PARAMETERS, "
            f"RESPONSE_FORMAT) SELECT TO_VARCHAR(t.{idc}), ROW_NUMBER() OVER (ORDER BY t.{idc}), {prompt}, {conv}, "
            f"?, ? FROM {src} t",
            (model_parameters, response_format),
        )


def all_statements(tables: StagingTables, model: str, chunk_size: int) -> Sequence[Statement]:
    """Every statement of a run (used by the syntax tests)."""
    return [
        *tables.create(),
        tables.count_requests(),
        tables.truncate_requests(),
        tables.pending_chunks(chunk_size),
        tables.complete_chunk(model, 0, chunk_size),
        tables.record_intent(0, "0123abcd", 1, 1700000000.0, "1234567", '{"app": "x"}'),
        tables.record_query_id("0123abcd", "01b2-q"),
        tables.forget_intent("0123abcd"),
        tables.open_intents(),
        tables.recorded_statements(),
        tables.first_submission(),
        tables.read_back(),
        tables.count_answered_twice(),
        history_of_session("1234567", tables.prefix),
        current_session(),
        set_query_tag('{"app": "airflow-provider-synth", "note": "it\'s"}'),
        set_query_tag(None),
        staging_tables_listing("SYNTH_DB", "PUBLIC", "SYNTH_CORTEX"),
        cancel_query("01b2-q"),
        *tables.drop(),
    ]
