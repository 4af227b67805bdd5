"""The Cortex SQL parses as Snowflake SQL, binds every value, and quotes identifiers so nothing can inject."""

from __future__ import annotations

import re

import pytest
import sqlglot
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlglot import exp

from airflow_provider_synth.hooks.cortex import history_of_session, quote_ident, set_query_tag, string_literal
from airflow_provider_synth.runs.cortex_sql import (
    StagingTables,
    TableSource,
    all_statements,
    split_name,
    table_ref,
)

TABLES = StagingTables("SYNTH_DB", "PUBLIC", "SYNTH_CORTEX_0123456789ABCDEF")
EVIL = "x'); DROP TABLE users; --"


def _parse(sql: str) -> exp.Expression:
    parsed = sqlglot.parse(sql, read="snowflake", error_level=sqlglot.ErrorLevel.RAISE)
    assert len(parsed) == 1 and parsed[0] is not None, f"not exactly one statement: {sql}"
    return parsed[0]


def test_every_statement_parses_as_one_snowflake_statement_with_bound_values():
    for sql, params in all_statements(TABLES, "llama3.1-8b", 500):
        tree = _parse(sql)
        assert sql.count("?") == len(params), sql
        assert not any(isinstance(lit, exp.Literal) and lit.is_string and "llama" in lit.this
                       for lit in tree.find_all(exp.Literal))
    table = TableSource("SRC_DB.RAW.PROMPTS", "id", prompt_column="question", params={"temperature": 0.1})
    for sql, params in (*table.checks(), table.stage(TABLES, "{}", None)):
        _parse(sql)
        assert sql.count("?") == len(params)


def test_chunk_statement_calls_each_cortex_function_once_per_shape_and_skips_answered_rows():
    sql, params = TABLES.complete_chunk("mistral-large2", chunk=2, chunk_size=100)
    tree = _parse(sql)
    assert isinstance(tree, exp.Insert)
    assert params == ("mistral-large2", 201, 300) * 3
    assert sql.count("AI_COMPLETE(") == 2 and sql.count("SNOWFLAKE.CORTEX.TRY_COMPLETE(") == 1
    assert sql.count("NOT EXISTS (SELECT 1 FROM") == 3
    assert "return_error_details => TRUE" in sql and "show_details => TRUE" in sql
    assert "CASE" not in sql  # a CASE branch is no promise that the model is not called


def test_model_names_and_ids_never_reach_the_sql_text():
    sql, params = TABLES.complete_chunk(EVIL, 0, 10)
    assert EVIL not in sql and EVIL in params
    for sql, params in (TABLES.record_intent(0, EVIL, 1, 1.0, EVIL, EVIL), TABLES.record_query_id(EVIL, EVIL),
                        history_of_session(EVIL, EVIL)):
        assert EVIL not in sql and EVIL in params


def test_literals_that_cannot_be_bound_cannot_end_their_quote():
    """A table COMMENT and ALTER SESSION SET QUERY_TAG take no bind parameter: the literal stays one string."""
    for text in (EVIL, "a\\'; DROP TABLE t; --", "\\", "it's"):
        sql, params = set_query_tag(text)
        strings = [lit.this for lit in _parse(sql).find_all(exp.Literal) if lit.is_string]
        assert params == () and strings == [text]  # parsed back to exactly the text, as one literal
        create = TABLES.create(f"airflow-provider-synth cortex staging {text}")[0][0]
        assert [lit.this for lit in _parse(create).find_all(exp.Literal) if lit.is_string][-1].endswith(text)
    with pytest.raises(ValueError):
        string_literal("two\nlines")
    with pytest.raises(ValueError):
        TABLES.create("not our comment")
    with pytest.raises(ValueError):
        set_query_tag("x" * 2001)


@pytest.mark.parametrize(
    ("name", "quoted"),
    [("my_table", '"MY_TABLE"'), ("T$1", '"T$1"'), ("_x", '"_X"'), ('"Mixed Case"', '"Mixed Case"'),
     ('"a""b"', '"a""b"'), ('"semi;colon"', '"semi;colon"')],
)
def test_quote_ident(name, quoted):
    assert quote_ident(name) == quoted


@pytest.mark.parametrize("name", ["", "1abc", "a b", 'a"b', "a;DROP TABLE x", "x'--", '""', "a.b", "A\n"])
def test_quote_ident_refuses_what_is_not_an_identifier(name):
    with pytest.raises(ValueError):
        quote_ident(name)


def test_split_and_table_ref():
    assert split_name('db."my.schema".t') == ["db", '"my.schema"', "t"]
    assert table_ref('db."my.schema".t') == '"DB"."my.schema"."T"'
    for bad in ("a..b", "a.b.c.d", '"open', ""):
        with pytest.raises(ValueError):
            split_name(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_any_quoted_name_stays_one_identifier(text):
    """Whatever a user puts inside double quotes stays a single identifier: no statement can be smuggled."""
    name = '"' + text.replace('"', '""') + '"'
    quoted = quote_ident(name)
    tree = _parse(f"SELECT 1 FROM {quoted}")
    tables = list(tree.find_all(exp.Table))
    assert len(tables) == 1 and tables[0].name == text


#: Snowflake's unquoted identifiers: a letter or _, then letters, digits, _ and $ (ASCII).
PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=30).filter(lambda t: not (len(t) >= 2 and t[0] == t[-1] == '"')))
@example("_")
@example("_$")
@example("1a")
@example("é")
@example("a-b")
def test_unquoted_names_are_plain_or_refused(text):
    try:
        quoted = quote_ident(text)
    except ValueError:
        assert not PLAIN.fullmatch(text)
        return
    assert quoted == '"' + text.upper() + '"' and PLAIN.fullmatch(text)


def test_table_source_needs_exactly_one_input_column_and_valid_names():
    with pytest.raises(ValueError, match="exactly one"):
        TableSource("t", "id")
    with pytest.raises(ValueError, match="exactly one"):
        TableSource("t", "id", prompt_column="p", messages_column="m")
    with pytest.raises(ValueError, match="not a plain Snowflake identifier"):
        TableSource("t", "id; DROP TABLE x", prompt_column="p")
    with pytest.raises(ValueError):
        TableSource("t; DROP TABLE x", "id", prompt_column="p")
