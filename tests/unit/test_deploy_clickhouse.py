"""deploy/clickhouse/project.sql: least privilege, one database per project."""

import re
from pathlib import Path

SQL = (Path(__file__).resolve().parents[2] / "deploy" / "clickhouse" / "project.sql").read_text()


def statements() -> list[str]:
    body = "\n".join(line for line in SQL.splitlines() if not line.startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def test_grants_touch_only_the_projects_database() -> None:
    grants = [s for s in statements() if s.startswith("GRANT")]
    assert grants == ["GRANT SELECT, INSERT, CREATE TABLE, CREATE VIEW, ALTER TTL, ALTER ADD COLUMN "
                      "ON coroot_${PROJECT}.* TO coroot_agent_${PROJECT}"]
    assert not re.search(r"\*\.\*|ON \*|DROP|CREATE DATABASE ON|ACCESS|ALL", " ".join(grants))


def test_every_statement_parses_as_clickhouse_sql() -> None:
    import clickhouse_connect  # the real ClickHouse parser, through chDB's formatQuery()

    client = clickhouse_connect.get_client(dsn="chdb://:memory:")
    try:
        for stmt in statements():
            rendered = stmt.replace("${PROJECT}", "production").replace("${PASSWORD}", "pw")
            formatted = client.query("SELECT formatQuery({q:String})", parameters={"q": rendered}).result_rows[0][0]
            assert formatted.split()[0] == rendered.split()[0]
    finally:
        client.close()
