"""What `coroot-agent query` and /api/query accept."""

import pytest

from agent.query import QueryRefused, check_read_only


@pytest.mark.parametrize("sql", [
    "SELECT 1", "select count() from otel_traces;", "  WITH x AS (SELECT 1) SELECT * FROM x",
    "SHOW TABLES", "DESCRIBE TABLE otel_traces", "DESC otel_logs", "EXPLAIN SELECT 1",
    "EXISTS TABLE metrics", "(SELECT 1) UNION ALL (SELECT 2)", "-- a comment\nSELECT 1",
    "/* c */ SELECT 'a;b'",
])
def test_reads_are_accepted(sql: str) -> None:
    assert check_read_only(sql)


@pytest.mark.parametrize(("sql", "why"), [
    ("DROP TABLE otel_traces", "refused DROP"),
    ("INSERT INTO otel_traces SELECT * FROM otel_traces", "refused INSERT"),
    ("ALTER TABLE otel_logs DELETE WHERE 1", "refused ALTER"),
    ("TRUNCATE TABLE metrics", "refused TRUNCATE"),
    ("SELECT 1; DROP TABLE otel_traces", "one statement at a time"),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", "INTO OUTFILE is not allowed"),
    ("   ", "empty query"),
    ("/* DROP */", "empty query"),
    ("SET readonly = 0", "refused SET"),
])
def test_everything_else_is_refused(sql: str, why: str) -> None:
    with pytest.raises(QueryRefused, match=why):
        check_read_only(sql)
