"""The families the Memcached, NATS, RabbitMQ and ZooKeeper plug-ins make, checked against the
node agent's (tests/unit/nodeagent_families.py, from its containers/l7.go and metrics.go): names,
types, label sets and status values; NATS and RabbitMQ have a `method` label, no histogram and
no inbound family. Packed events through the tracer, no kernel."""

from __future__ import annotations

from agent.l7 import contract
from agent.l7.contract import F_INBOUND, F_OUTBOUND, F_WRITE, Event, pack
from agent.l7.zookeeper import GET_DATA, GET_DATA_REPLY
from agent.metrics import Families
from tests.unit.l7_helpers import paired, tracer
from tests.unit.nodeagent_families import CONST_LABELS, FAMILIES, L7_STATUS

PUBLISH = bytes.fromhex("0100010000000b003c002800000002747100ce0200010000000f003c00000000000000000002100001ce"
                        "03000100000002610ace")


def pair(proto: int, flags: int, request: bytes, response: bytes, fd: int, pid: int) -> bytes:
    return paired(proto, flags, request, response, fd=fd, pid=pid)


def message(proto: int, flags: int, data: bytes, fd: int, pid: int) -> bytes:
    return pack(Event(1_000, 0, 55, pid, fd, proto, flags, b"", data, len(data)))


def families() -> dict[str, tuple[str, set[frozenset[str]], set[str]]]:
    """name -> (type, label sets of its samples, status values) of what the tracer exports."""
    t, conns, _ = tracer()
    for fd, port in ((7, 11211), (8, 2181), (9, 4222), (10, 5672)):
        conns.add(100, fd, 55, "10.0.0.9", port, actual=f"10.0.0.9:{port}")
    for flags, pid, fds in ((F_OUTBOUND, 100, (7, 8, 9, 10)), (F_INBOUND, 200, (3, 4, 5, 6))):
        mc, zk, nats, amqp = fds
        t.handle_event(pair(contract.MEMCACHED, flags, b"get k1\r\n", b"END\r\n", mc, pid))
        t.handle_event(pair(contract.MEMCACHED, flags, b"incr k1 1\r\n", b"CLIENT_ERROR x\r\n", mc, pid))
        zk_request = GET_DATA if flags == F_OUTBOUND else GET_DATA[4:]
        t.handle_event(pair(contract.ZOOKEEPER, flags, zk_request, GET_DATA_REPLY, zk, pid))
        client_write = F_WRITE if flags == F_OUTBOUND else 0
        t.handle_event(message(contract.NATS, flags | client_write, b"PUB a 2\r\nhi\r\n", nats, pid))
        t.handle_event(message(contract.NATS, flags | (client_write ^ F_WRITE), b"MSG a 1 2\r\nhi\r\n", nats, pid))
        t.handle_event(message(contract.RABBITMQ, flags | client_write, PUBLISH, amqp, pid))
    f = Families({"machine_id": "m", "system_uuid": "u"})
    t.collect(f)
    out: dict[str, tuple[str, set[frozenset[str]], set[str]]] = {}
    for fam in f:
        if not fam.name.startswith(("container_memcached", "container_zookeeper", "container_nats",
                                    "container_rabbitmq")):
            continue
        name = fam.name + "_total" if fam.type == "counter" else fam.name  # counters are named without it
        kind, sets, statuses = out.setdefault(name, (fam.type, set(), set()))
        for s in fam.samples:
            sets.add(frozenset(s.labels) - {"le"})
            if "status" in s.labels:
                statuses.add(s.labels["status"])
    return out


def test_names_types_labels_and_statuses_are_the_node_agents() -> None:
    got = families()
    assert set(got) == {
        "container_memcached_queries_total", "container_memcached_queries_duration_seconds_total",
        "container_memcached_inbound_queries_total", "container_memcached_inbound_queries_duration_seconds_total",
        "container_zookeeper_requests_total", "container_zookeeper_requests_duration_seconds_total",
        "container_zookeeper_inbound_requests_total", "container_zookeeper_inbound_requests_duration_seconds_total",
        "container_nats_messages_total", "container_rabbitmq_messages_total",
    }
    for name, (kind, sets, statuses) in got.items():
        want_kind, want_labels = FAMILIES[name]
        assert kind == want_kind, name
        assert sets == {want_labels | CONST_LABELS}, name
        protocol = name.split("_")[1]
        assert statuses <= set(L7_STATUS[protocol]), name
    assert got["container_memcached_queries_total"][2] == {"ok", "failed"}
    assert got["container_zookeeper_requests_total"][2] == {"ok"}
