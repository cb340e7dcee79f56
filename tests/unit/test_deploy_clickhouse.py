"""deploy/clickhouse/project.sql: least privilege, one database per project, and exactly the
grants the agent's statements need (derived here from agent/sinks/schema.py's DDL and migration
plans, which agent/sinks/store.py runs at start-up)."""

import re
from pathlib import Path

from agent.sinks import schema

SQL = (Path(__file__).resolve().parents[2] / "deploy" / "clickhouse" / "project.sql").read_text()
TTLS = {"traces": 604800, "logs": 86400, "profiles": 129600, "metrics": 604800}


def statements() -> list[str]:
    body = "\n".join(line for line in SQL.splitlines() if not line.startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def _earlier(table: schema.Table, **keys: str) -> schema.ExistingTable:
    """`table` as an earlier agent made it: a column missing, other codecs, no indexes, another
    deduplication window; keys as given (default: this schema's)."""
    want = schema.wanted_columns(table)
    first = next(n for n, (c, _t, kind) in want.items() if c.name == n and not kind)
    cols = {n: schema.ExistingColumn(t, kind, "CODEC(LZ4)") for n, (_c, t, kind) in want.items() if n != first}
    return schema.ExistingTable(
        table.name, keys.get("engine", table.engine), keys.get("partition", table.partition_by),
        keys.get("sorting", table.order_by or table.primary_key), table.primary_key or table.order_by,
        "CREATE TABLE x (a DateTime64(9) CODEC(DoubleDelta, ZSTD(1))) SETTINGS index_granularity = 8192, "
        "non_replicated_deduplication_window = 5", cols, frozenset())


def migration_statements() -> list[str]:
    """Every kind of statement the start-up migration issues, for every table and view."""
    db = "coroot_production"
    out = schema.migration(db, TTLS)[1:]  # CREATE DATABASE is tried, and its refusal tolerated
    for t in schema.TABLES:
        out += schema.plan_table(t, _earlier(t), db).alters
        if t.ttl_column:
            out.append(schema.modify_ttl(t, db, 3600))
        rebuilt = _earlier(t, sorting="Other")
        assert schema.plan_table(t, rebuilt, db).rebuild
        out += schema.rebuild_statements(t, rebuilt, db, 3600)
        out.append(f"SELECT count() FROM {db}.{t.name}")  # the rebuild's row check
    out += [schema.drop_view(v, db) for v in schema.VIEWS]
    return out


# Statement -> the privileges ClickHouse checks for it (its access-rights documentation; EXCHANGE
# TABLES is checked as a rename both ways: SELECT and DROP on the source, CREATE and INSERT on the
# target). A statement of a kind not listed fails the test: a new kind needs its grant reviewed.
_NEEDS = [
    (r"CREATE TABLE .* ENGINE = Distributed", {"CREATE TABLE"}),
    (r"CREATE TABLE ", {"CREATE TABLE"}),
    (r"CREATE MATERIALIZED VIEW ", {"CREATE VIEW"}),
    (r"ALTER TABLE \S+ ADD COLUMN ", {"ALTER ADD COLUMN"}),
    (r"ALTER TABLE \S+ ADD INDEX ", {"ALTER ADD INDEX"}),
    (r"ALTER TABLE \S+ MODIFY COLUMN \S+ CODEC\(", {"ALTER MODIFY COLUMN"}),
    (r"ALTER TABLE \S+ MODIFY SETTING ", {"ALTER SETTINGS"}),
    (r"ALTER TABLE \S+ MODIFY TTL ", {"ALTER TTL"}),
    (r"DROP TABLE ", {"DROP TABLE"}),
    (r"DROP VIEW ", {"DROP VIEW"}),
    (r"EXCHANGE TABLES ", {"SELECT", "INSERT", "CREATE TABLE", "DROP TABLE"}),
    (r"INSERT INTO \S+ \(.*\) SELECT ", {"INSERT", "SELECT"}),
    (r"SELECT ", {"SELECT"}),
]


def required() -> set[str]:
    need = {"SELECT", "INSERT"}  # queries and the rows the agent writes
    for stmt in migration_statements():
        kinds = [n for rx, n in _NEEDS if re.match(rx, stmt, re.S)]
        assert kinds, f"no grant known for: {stmt[:120]}"
        need |= kinds[0]
    return need


def _format(sql: str) -> str:
    import clickhouse_connect  # the real ClickHouse parser, through chDB's formatQuery()

    client = clickhouse_connect.get_client(dsn="chdb://:memory:")
    try:
        return str(client.query("SELECT formatQuery({q:String})", parameters={"q": sql}).result_rows[0][0])
    finally:
        client.close()


def test_grants_are_exactly_what_the_agents_statements_need_on_the_projects_database_only() -> None:
    grants = [s for s in statements() if s.startswith("GRANT")]
    assert len(grants) == 1
    rendered = grants[0].replace("${PROJECT}", "production")
    # The parser names each privilege canonically (ALTER MODIFY TTL -> ALTER TTL, ...).
    m = re.fullmatch(r"GRANT (.+) ON coroot_production\.\* TO coroot_agent_production", _format(rendered))
    assert m, _format(rendered)
    granted = {p.strip() for p in m.group(1).split(",")}
    assert granted == required(), (sorted(granted - required()), sorted(required() - granted))
    assert not re.search(r"\*\.\*|ON \*|CREATE DATABASE|ACCESS|\bALL\b|TRUNCATE|ALTER DELETE|ALTER UPDATE|"
                         r"ALTER TABLE\b|ALTER DROP|SYSTEM|\bROLE\b|\bUSER\b", m.group(1))


def test_every_statement_parses_as_clickhouse_sql() -> None:
    for stmt in statements():
        rendered = stmt.replace("${PROJECT}", "production").replace("${PASSWORD}", "pw")
        assert _format(rendered).split()[0] == rendered.split()[0]
