"""What `coroot-agent query` and /api/query accept, decided by the real engine's parser (chDB),
and that what is refused never ran: no file written, nothing read outside the store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config
from agent.query import (
    MAX_QUERY_BYTES,
    QueryRefused,
    check_ast,
    lexical_check,
    parse_explain,
    prescan,
    quote_literal,
    words,
)
from agent.sinks.store import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path = tmp_path_factory.mktemp("store")
    s = Store(config.load({"storage_path": str(path)}, {}, None))
    s.open()
    s.migrate()
    yield s
    s.close()


@pytest.mark.parametrize(("sql", "want"), [
    ("SELECT 1", b"1\n"),
    ("select count() from otel_traces;", b"0\n"),
    ("  WITH x AS (SELECT 1) SELECT * FROM x", b"1\n"),
    ("(SELECT 1) UNION ALL (SELECT 2)", b"1\n2\n"),
    ("-- a comment\nSELECT 1", b"1\n"),
    ("/* c */ SELECT 'a;b'", b"a;b\n"),
    ("SELECT 'INTO OUTFILE', 'FORMAT x'", b"INTO OUTFILE\tFORMAT x\n"),
    ("EXISTS TABLE metrics", b"1\n"),
    ("SELECT sum(number) FROM numbers(10)", b"45\n"),
    ("SELECT count() FROM system.tables WHERE database = 'coroot' AND name = 'otel_traces'", b"1\n"),
    ("SELECT count() FROM coroot.otel_logs", b"0\n"),
])
def test_reads_are_accepted_and_run(store: Store, sql: str, want: bytes) -> None:
    # rows in any order: the engine runs a UNION ALL's parts side by side (2 before 1, now and then)
    assert sorted(store.query(sql, "TSV").splitlines()) == sorted(want.splitlines())


@pytest.mark.parametrize("sql", ["SHOW TABLES", "DESCRIBE TABLE otel_traces", "DESC otel_logs",
                                 "EXPLAIN SELECT 1", "SHOW CREATE TABLE otel_traces"])
def test_schema_reads_are_accepted(store: Store, sql: str) -> None:
    assert store.query(sql, "TSV")


@pytest.mark.parametrize(("sql", "why"), [
    ("DROP TABLE otel_traces", "refused DROP"),
    ("INSERT INTO otel_traces SELECT * FROM otel_traces", "refused INSERT"),
    ("ALTER TABLE otel_logs DELETE WHERE 1", "refused ALTER"),
    ("TRUNCATE TABLE metrics", "refused TRUNCATE"),
    ("SET readonly = 0", "refused SET"),
    ("SYSTEM FLUSH LOGS", "refused SYSTEM"),
    ("SELECT 1; DROP TABLE otel_traces", "one statement at a time"),
    ('SELECT 1 AS "a\'"; CREATE TABLE t (a Int8) ENGINE=Memory; SELECT \'\'', "one statement at a time"),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", "INTO OUTFILE"),
    ("SELECT 1 FORMAT JSON", "FORMAT clause"),
    ("SELECT 1 SETTINGS max_threads = 1", "setting"),
    ("SELECT * FROM file('/etc/shadow', 'LineAsString')", "table function file"),
    ("SELECT file('/etc/hostname')", "function file"),
    ("SELECT arrayMap(x -> file(x), ['/etc/hostname'])", "function file"),
    ("SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')", "table function url"),
    ("SELECT * FROM s3('http://127.0.0.1:1/b/k', 'LineAsString')", "table function s3"),
    ("SELECT * FROM remote('127.0.0.1:1', system.one)", "table function remote"),
    ("SELECT * FROM mysql('127.0.0.1:1', 'd', 't', 'u', 'p')", "table function mysql"),
    ("SELECT * FROM postgresql('127.0.0.1:1', 'd', 't', 'u', 'p')", "table function postgresql"),
    ("SELECT * FROM merge('system', '.*')", "table function merge"),
    ("DESCRIBE file('/etc/passwd')", "table function file"),
    ("SELECT sleepEachRow(1) FROM numbers(100)", "function sleepEachRow"),
    ("SELECT sleep(3)", "function sleep"),
    ("SELECT dictGet('d', 'a', 1)", "function dictGet"),
    ("SELECT * FROM system.users", "outside the agent's database"),
    ("SELECT 1 WHERE 1 IN system.users", "outside the agent's database"),
    ("SELECT * FROM otel_traces AS t JOIN system.processes AS p ON 1", "outside the agent's database"),
    ("SELECT * FROM information_schema.tables", "outside the agent's database"),
    ("EXPLAIN INSERT INTO otel_traces SELECT * FROM otel_traces", "EXPLAIN only of a read"),
    ("EXPLAIN SELECT * FROM file('/etc/passwd')", "table function file"),
    ("   ", "empty query"),
    ("/* DROP */", "empty query"),
    ("SELEC 1", "syntax error"),
])
def test_everything_else_is_refused(store: Store, sql: str, why: str) -> None:
    with pytest.raises(QueryRefused, match=why):
        store.query(sql, "TSV")


def test_into_outfile_hidden_by_a_comment_writes_nothing(store: Store, tmp_path: Path) -> None:
    target = tmp_path / "written-by-query"
    for sql in (f"SELECT 'x' AS x INTO # c\nOUTFILE '{target}'",
                f"SELECT 'x' AS x INTO /* c */ OUTFILE '{target}' APPEND",
                f"SELECT 'x' AS x INTO -- c\nOUTFILE '{target}' TRUNCATE"):
        with pytest.raises(QueryRefused, match="INTO OUTFILE"):
            store.query(sql, "TSV")
    assert not os.path.exists(target)


def test_refused_ddl_leaves_the_schema_as_it_was(store: Store) -> None:
    before = store.query("SELECT name FROM system.tables WHERE database = 'coroot' ORDER BY name", "TSV")
    for sql in ('SELECT 1 AS "a\'"; DROP TABLE otel_traces; SELECT \'\'',
                "SELECT 1 AS `a\\`; DROP TABLE otel_traces; SELECT 1",
                "SELECT '\\\\'; DROP TABLE otel_traces; SELECT ''"):
        with pytest.raises(QueryRefused):
            store.query(sql, "TSV")
    assert store.query("SELECT name FROM system.tables WHERE database = 'coroot' ORDER BY name", "TSV") == before


def test_the_read_session_keeps_its_limits_and_inserts_are_not_readonly(store: Store) -> None:
    with pytest.raises(QueryRefused, match="function getSetting"):
        store.query("SELECT getSetting('readonly')", "TSV")
    reader = store._need_reader()  # the session itself, through its client
    row = reader.raw_query("SELECT getSetting('readonly'), getSetting('max_execution_time'), "
                           "getSetting('max_result_rows')", fmt="TSV")
    assert row == b"1\t10\t1000000\n"
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    store.insert("metrics", ["Timestamp", "MetricName", "Value"], [(now, "test_metric", 1.0)], token="t1")
    assert store.query("SELECT count() FROM metrics WHERE MetricName = 'test_metric'", "TSV") == b"1\n"


def test_result_rows_over_the_limit_are_refused_by_the_engine(store: Store) -> None:
    from agent.sinks.store import StoreError

    with pytest.raises(StoreError, match="max rows|TOO_MANY_ROWS|Limit for result"):
        store.query("SELECT number FROM numbers(2000000)", "TSV")


# ----------------------------------------------------------- without an engine ---


def test_prescan_caps_the_size_and_refuses_nul() -> None:
    with pytest.raises(QueryRefused, match=f"at most {MAX_QUERY_BYTES}"):
        prescan("SELECT '" + "a" * MAX_QUERY_BYTES + "'")
    with pytest.raises(QueryRefused, match="NUL"):
        prescan("SELECT 1\0")
    assert prescan("  SELECT 1 ;; \n") == "SELECT 1"


def test_quote_literal_ends_only_at_its_own_quote() -> None:
    assert quote_literal("a'b\\c") == "'a\\'b\\\\c'"
    assert words(quote_literal("x'; DROP TABLE t; --")) == []


def test_words_are_linear_on_the_quote_bomb() -> None:
    import time

    text = "'\\'" * 40_000  # the body that froze the old regex guard for 58 s
    t = time.perf_counter()
    words(text)
    assert time.perf_counter() - t < 0.5


def test_lexical_check_finds_outfile_and_second_statements() -> None:
    with pytest.raises(QueryRefused, match="INTO OUTFILE"):
        lexical_check("SELECT 1 INTO OUTFILE 'x'")
    with pytest.raises(QueryRefused, match="one statement"):
        lexical_check("SELECT 1; SELECT 2")
    lexical_check("SELECT 'INTO OUTFILE; x' AS `a;b`")


def test_check_ast_on_recorded_explain_output() -> None:
    recorded = "\n".join([
        "SelectWithUnionQuery (children 2)",
        " ExpressionList (children 1)",
        "  SelectQuery (children 2)",
        "   ExpressionList (children 1)",
        "    Asterisk",
        "   TablesInSelectQuery (children 1)",
        "    TablesInSelectQueryElement (children 1)",
        "     TableExpression (children 1)",
        "      Function file (children 1)",
        "       ExpressionList (children 2)",
        "        Literal \\'/etc/shadow\\'",
        " Identifier TSV",
    ])
    with pytest.raises(QueryRefused, match="table function file"):
        check_ast(parse_explain(recorded), "coroot")
    ok = recorded.replace("Function file", "Function numbers")
    check_ast(parse_explain(ok), "coroot")
