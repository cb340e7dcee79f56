"""The L7 plug-ins, one module each (see agent/l7/protocol.py for what a plug-in is). A new
protocol: its module here, its detector header under bpf/include/l7/ with a line in
protocols.h's l7_detect, and its id in both contract files."""

from __future__ import annotations

from agent.l7 import (
    cassandra,
    clickhouse,
    dns,
    dubbo2,
    foundationdb,
    http,
    http2,
    kafka,
    memcached,
    mongo,
    mysql,
    nats,
    postgres,
    rabbitmq,
    redis,
    zookeeper,
)
from agent.l7.protocol import Protocol

PLUGINS: tuple[type[Protocol], ...] = (http.Http, postgres.Postgres, redis.Redis, dns.Dns, http2.Http2,
                                      nats.Nats, rabbitmq.Rabbitmq, zookeeper.Zookeeper, mysql.Mysql,
                                      memcached.Memcached, mongo.Mongo, kafka.Kafka,
                                      cassandra.Cassandra, clickhouse.Clickhouse, dubbo2.Dubbo2,
                                      foundationdb.FoundationDB)
