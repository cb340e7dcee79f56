-- One database and one least-privilege user per Coroot project, so that one project's agent
-- credentials cannot read or write another project's data (the seed's "API key isolation" and
-- "ClickHouse auth" rows). Render with envsubst, run as a ClickHouse administrator:
--   PROJECT=production PASSWORD=$(openssl rand -hex 24) envsubst < project.sql | clickhouse-client --multiquery
-- then give the agents of that project:
--   global_clickhouse: {address: clickhouse:8443, user: coroot_agent_${PROJECT}, password: ..., database: coroot_${PROJECT}, tls_enable: true}

CREATE DATABASE IF NOT EXISTS coroot_${PROJECT};

CREATE USER IF NOT EXISTS coroot_agent_${PROJECT} IDENTIFIED WITH sha256_password BY '${PASSWORD}';

-- SELECT: `coroot-agent query`, and reading table definitions to compare TTLs.
-- INSERT: spans, logs, profiles, metric history.
-- CREATE TABLE, CREATE VIEW: the schema and its materialized views at start-up.
-- ALTER TTL: keeping each table's TTL equal to the agent's configuration.
-- ALTER ADD COLUMN: schema additions in later versions.
-- Nothing on any other database; no CREATE DATABASE, DROP, or access management.
GRANT SELECT, INSERT, CREATE TABLE, CREATE VIEW, ALTER TTL, ALTER ADD COLUMN ON coroot_${PROJECT}.* TO coroot_agent_${PROJECT};
