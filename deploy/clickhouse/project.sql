-- One database and one least-privilege user per Coroot project, so that one project's agent
-- credentials cannot read or write another project's data (the seed's "API key isolation" and
-- "ClickHouse auth" rows). Render with envsubst, run as a ClickHouse administrator:
--   PROJECT=production PASSWORD=$(openssl rand -hex 24) envsubst < project.sql | clickhouse-client --multiquery
-- then give the agents of that project:
--   global_clickhouse: {address: clickhouse:8443, user: coroot_agent_${PROJECT}, password: ..., database: coroot_${PROJECT}, tls_enable: true}

CREATE DATABASE IF NOT EXISTS coroot_${PROJECT};

CREATE USER IF NOT EXISTS coroot_agent_${PROJECT} IDENTIFIED WITH sha256_password BY '${PASSWORD}';

-- What the agent runs there, and nothing more (tests/unit/test_deploy_clickhouse.py derives this
-- list from the statements of the agent's start-up migration, agent/sinks/schema.py and store.py):
-- SELECT: `coroot-agent query`, reading table definitions, counting a rebuilt table's rows.
-- INSERT: spans, logs, profiles, metric history; copying a table's rows when it is rebuilt.
-- CREATE TABLE, CREATE VIEW: the schema and its materialized views.
-- ALTER ADD COLUMN, ALTER ADD INDEX: columns and indexes a table made by an earlier version lacks.
-- ALTER MODIFY COLUMN, ALTER MODIFY SETTING: codecs and settings of the agent's own earlier tables.
-- ALTER MODIFY TTL: keeping each table's TTL equal to the agent's configuration.
-- DROP TABLE: a table rebuilt in the new shape replaces the old one (EXCHANGE TABLES, then DROP;
--   EXCHANGE needs SELECT, INSERT, CREATE TABLE and DROP TABLE on both tables).
-- DROP VIEW: a materialized view of an earlier shape is dropped and created again.
-- Nothing on any other database; no CREATE DATABASE (the agent tolerates its absence), no
-- TRUNCATE, no ALTER DELETE/UPDATE, no access management.
GRANT SELECT, INSERT, CREATE TABLE, CREATE VIEW, ALTER ADD COLUMN, ALTER ADD INDEX, ALTER MODIFY COLUMN, ALTER MODIFY SETTING, ALTER MODIFY TTL, DROP TABLE, DROP VIEW ON coroot_${PROJECT}.* TO coroot_agent_${PROJECT};
