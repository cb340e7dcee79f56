"""Shared by the L7 unit tests: in-memory stand-ins for the tracer's neighbours (the TCP
tracker's connections, the registry's containers, the sink) with the same methods, and readers
of the series a tracer exports. The real neighbours are exercised by tests/system/test_l7*.py."""

from __future__ import annotations

from typing import Any

from agent.containers.registry import Container, Process
from agent.l7.tracer import L7Tracer
from agent.metrics import Families
from agent.net.tcp import Conn
from agent.sinks import schema

CID = "/system.slice/app.service"


class Connections:
    def __init__(self) -> None:
        self.conns: dict[tuple[int, int, int], Conn] = {}
        self.resolved = 0

    def add(self, pid: int, fd: int, start: int, dst: str, port: int, actual: str | None = None) -> Conn:
        c = Conn(pid, fd, CID, "10.0.0.1", 40000, dst, port, f"{dst}:{port}", actual, start_ns=start)
        self.conns[(pid, fd, start)] = c
        return c

    def connection(self, pid: int, fd: int, start_ns: int) -> Conn | None:
        return self.conns.get((pid, fd, start_ns))

    def is_open(self, pid: int, fd: int, start_ns: int) -> bool:
        return (pid, fd, start_ns) in self.conns

    def resolve_pending(self) -> None:
        self.resolved += 1


class Containers:
    procfs = "/nonexistent"

    def __init__(self) -> None:
        self.c = Container(CID, "/system.slice/app.service", "systemd", CID, {}, 0.0)
        self.pids = {100, 200}

    def container(self, cid: str) -> Container | None:
        return self.c if cid == CID else None

    def container_of_recent(self, pid: int) -> Container | None:
        return self.c if pid in self.pids else None

    def process(self, pid: int) -> Process | None:
        return Process(pid, 0, "x", CID, CID, frozenset()) if pid in self.pids else None

    def containers(self) -> list[Container]:
        return [self.c]


class Rows:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, table: str, row: tuple[Any, ...]) -> None:
        assert table == "otel_traces"
        self.rows.append(dict(zip(schema.TABLES_BY_NAME[table].insert_columns, row, strict=True)))


def samples(t: L7Tracer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    f = Families({})
    t.collect(f)
    t.self_metrics(f)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in f for s in fam.samples}


def value(t: L7Tracer, name: str, **labels: str) -> float:
    total = 0.0
    for (n, lbl), v in samples(t).items():
        d = dict(lbl)
        if n == name and all(d.get(k) == want for k, want in labels.items()):
            total += v
    return total
