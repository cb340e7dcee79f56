"""Shared by the L7 unit tests: in-memory stand-ins for the tracer's neighbours (the TCP
tracker's connections, the registry's containers, the sink) with the same methods, and readers
of the series a tracer exports. The real neighbours are exercised by tests/system/test_l7*.py."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from agent.containers.registry import Container, Process
from agent.ebpf.loader import BPF_DIR
from agent.l7 import contract
from agent.l7.contract import Event, pack
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

    def destination_ips(self, since: float) -> set[str]:
        return {c.dst for c in self.conns.values()}


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


def tracer() -> tuple[L7Tracer, Connections, Rows]:
    """A tracer over the stand-ins: (tracer, its connections, its span rows)."""
    conns, rows = Connections(), Rows()
    return L7Tracer(Containers(), conns, rows, hostname="h", host_id="m"), conns, rows


def paired(proto: int, flags: int, req: bytes, resp: bytes, *, pid: int = 100, fd: int = 7, start: int = 55,
           ms: int = 2) -> bytes:
    """A request and its response as the kernel sends them, `ms` apart."""
    return pack(Event(1_000, ms * 1_000_000, start, pid, fd, proto, flags, req, resp))


def one_way_event(proto: int, data: bytes, flags: int, fd: int, pid: int = 100, start: int = 55) -> bytes:
    """A one-way message as the kernel sends it (contract.h): the call's first CA_L7_PAYLOAD
    bytes fill resp[] first, then req[]."""
    kept, r = data[:contract.PAYLOAD_DEFAULT], contract.RESP_MAX
    return pack(Event(1_000, 0, start, pid, fd, proto, flags, kept[r:], kept[:r], len(data)))


# ------------------------------------------------------------ the kernel's detectors, natively --

def build_detector(directory: Path) -> Path:
    """tests/unit/native/l7_detect.c built against bpf/include: the kernel's detectors as a program."""
    exe = directory / "l7_detect"
    src = Path(__file__).parent / "native" / "l7_detect.c"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-I", str(BPF_DIR / "include"), "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    return exe


def detector_lines(exe: Path, payloads: list[bytes]) -> list[list[int]]:
    """The detector's numbers for each payload (a line each: l7_detect first)."""
    out = subprocess.run([str(exe)], input="".join(p.hex() + "\n" for p in payloads),
                         check=True, capture_output=True, text=True).stdout
    return [[int(x) for x in line.split()] for line in out.splitlines()]
