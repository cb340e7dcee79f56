"""The component shape (agent/component.py) as `Agent` drives it: one scrape collector over the
list, ticks in order, closes in reverse; the parts that became components keep to it (a scrape
only reads, rows are built by column name, probes detach side by side and nothing attaches
after, a stop is bounded and never leaves a traceback).

No kernel here: where a part needs the BPF maps, a table with BCC's interface (Key/Leaf ctypes
types, item access, items/keys/clear) stands in, and the test says so. The system tests load
the real programs."""

from __future__ import annotations

import ctypes
import http.server
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from agent import config
from agent.component import Component
from agent.containers.cgroup import service_name
from agent.containers.registry import Container, Process
from agent.ebpf import loader
from agent.ebpf.maps import AttachError, BpfMap, ProgramsClosing
from agent.l7 import tls as tls_mod
from agent.logs.collector import LogCollector
from agent.metrics import Families
from agent.net.public import PublicFilter
from agent.net.tcp import EV_CLOSE, EV_CONNECT, TCP_EVENT, TcpTracker
from agent.profiling.profiler import PROFILE_TYPE, Profiler, stack_hash
from agent.run import Agent, ComponentsCollector
from agent.sinks import schema
from agent.sinks.batcher import Sink
from agent.sinks.history import MetricHistory
from agent.sinks.remote_write import RemoteWriter
from agent.sinks.spool import Spool
from agent.sinks.store import StoreError

CID = "/system.slice/app.service"


def container(cid: str = CID, app: str = "app") -> Container:
    return Container(cid, app, "systemd", cid, {}, 0.0)


def series(f: Families, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for m in f for s in m.samples if s.name == name}


# ------------------------------------------------------------ the list --

class Recorder(Component):
    """Writes down each call, in one list shared by several."""

    def __init__(self, name: str, calls: list[str], fail: str = "") -> None:
        self.name = name
        self.calls = calls
        self.fail = fail

    def _call(self, what: str) -> None:
        self.calls.append(f"{self.name}.{what}")
        if what == self.fail:
            raise RuntimeError(f"{self.name} fails in {what}")

    def tick(self, now: float, gone: list[str]) -> None:
        self._call("tick")

    def collect(self, f: Families) -> None:
        self._call("collect")
        f.counter("test_things_total", "things", 1, part=self.name)

    def self_metrics(self, f: Families) -> None:
        self._call("self_metrics")
        f.gauge("coroot_agent_test_up", "up", 1, part=self.name)

    def close(self) -> None:
        self._call("close")


def test_one_collector_asks_every_component_in_order_with_the_host_labels() -> None:
    calls: list[str] = []
    parts = [Recorder("a", calls), Recorder("b", calls, fail="collect"), Recorder("c", calls)]
    fams = {m.name: m for m in ComponentsCollector(parts, {"machine_id": "m1"}).collect()}
    assert calls == ["a.collect", "a.self_metrics", "b.collect", "c.collect", "c.self_metrics"]
    # b failed: logged and skipped, the others answer
    assert [(s.labels, s.value) for s in fams["test_things"].samples] == [
        ({"machine_id": "m1", "part": "a"}, 1.0), ({"machine_id": "m1", "part": "c"}, 1.0)]
    assert [s.labels["part"] for s in fams["coroot_agent_test_up"].samples] == ["a", "c"]


def test_a_component_implements_only_what_it_does() -> None:
    c = Component()
    f = Families({})
    c.attach(None)
    c.start()
    c.tick(0.0, [])
    c.collect(f)
    c.self_metrics(f)
    c.close()
    c.close()
    assert list(f) == []


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(config.load({"storage_path": str(tmp_path)}, {}, None))


def test_the_agent_ticks_in_order_and_closes_in_reverse_even_past_a_failure(agent: Agent) -> None:
    calls: list[str] = []
    agent.components = [Recorder("bpf", calls), Recorder("sink", calls, fail="close"),
                        Recorder("tcp", calls, fail="tick"), Recorder("logs", calls)]
    agent._tick(time.monotonic())
    assert calls == ["bpf.tick", "sink.tick", "tcp.tick", "logs.tick"]
    calls.clear()
    agent.stop()
    assert calls == ["logs.close", "tcp.close", "sink.close", "bpf.close"]
    assert agent.components == []
    agent.stop()  # twice: nothing more
    assert calls == ["logs.close", "tcp.close", "sink.close", "bpf.close"]


# ------------------------------------------------------- BCC stand-in --

class ConnKey(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("fd", ctypes.c_uint32)]


class ConnLeaf(ctypes.Structure):
    _fields_ = [("sk", ctypes.c_uint64), ("start_ns", ctypes.c_uint64), ("bytes_sent", ctypes.c_uint64),
                ("bytes_received", ctypes.c_uint64), ("retransmits", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class Table:
    """BCC's table interface over a dict (keys compared by their bytes, as the kernel does)."""

    def __init__(self, key: Any, leaf: Any) -> None:
        self.Key, self.Leaf = key, leaf
        self.d: dict[bytes, tuple[Any, Any]] = {}

    def __getitem__(self, k: Any) -> Any:
        return self.d[bytes(k)][1]

    def __setitem__(self, k: Any, v: Any) -> None:
        self.d[bytes(k)] = (k, v)

    def __delitem__(self, k: Any) -> None:
        del self.d[bytes(k)]

    def items(self) -> list[tuple[Any, Any]]:
        return list(self.d.values())

    def keys(self) -> list[Any]:
        return [k for k, _ in self.d.values()]

    def clear(self) -> None:
        self.d.clear()


class FakePrograms:
    """`Programs` over stand-in tables; uprobes succeed unless the symbol is listed as missing."""

    def __init__(self, tables: dict[str, Table] | None = None, missing: tuple[str, ...] = (),
                 closing: bool = False) -> None:
        self.tables = tables or {}
        self.missing = missing
        self.closing = closing
        self.attached: list[tuple[str, str, str, bool]] = []

    def map(self, name: str) -> BpfMap:
        return BpfMap(self.tables[name], name)

    def attach_uprobe(self, path: str, symbol: str, fn_name: str, *, ret: bool = False) -> None:
        if self.closing:
            raise ProgramsClosing(symbol)
        if symbol in self.missing:
            raise AttachError(f"no {symbol} in {path}")
        self.attached.append((path, symbol, fn_name, ret))

    def detach_uprobe(self, path: str, symbol: str, *, ret: bool = False) -> None:
        self.attached.remove(next(a for a in self.attached if a[:2] == (path, symbol) and a[3] == ret))


# ------------------------------------------------------------------ TCP --

class TcpRegistry:
    procfs = "/proc"

    def __init__(self) -> None:
        self.c = container()

    def container_of_recent(self, pid: int) -> Container:
        return self.c

    def container_of(self, pid: int) -> Container:
        return self.c

    def process(self, pid: int) -> None:
        return None  # no process placed provisionally

    def containers(self) -> list[Container]:
        return [self.c]

    def pids(self) -> list[int]:
        return []


class NoConntrack:
    """No NAT: every connection's actual destination is its destination."""

    def __init__(self) -> None:
        self.resolved = 0
        self.closed = False

    def netns_of(self, pid: int) -> int:
        return 1

    def resolve(self, items: list[Any]) -> list[None]:
        self.resolved += len(items)
        return [None] * len(items)

    def close(self) -> None:
        self.closed = True


def tcp_event(kind: int, pid: int, fd: int, dst: str = "10.0.0.9", dport: int = 80, sent: int = 0,
              received: int = 0) -> bytes:
    addr = socket.inet_aton(dst) + bytes(12)
    return TCP_EVENT.pack(1_000, 2_000_000, sent, received, kind, pid, fd, 0, 2, 40000, dport, 0,
                          socket.inet_aton("10.0.0.1") + bytes(12), addr)


def test_a_scrape_of_tcp_only_reads_and_the_tick_counts() -> None:
    conns = Table(ConnKey, ConnLeaf)
    ct = NoConntrack()
    t = TcpTracker(TcpRegistry(), PublicFilter(["0.0.0.0/0"]), (32768, 60999), conntrack=ct)  # type: ignore[arg-type]
    t._live = FakePrograms({"conns": conns}).map("conns")  # attach() would also seed from /proc
    t.handle_event(tcp_event(EV_CONNECT, 100, 5))
    conns[ConnKey(100, 5)] = ConnLeaf(bytes_sent=300, bytes_received=40)
    lbl = (("actual_destination", "10.0.0.9:80"), ("app_id", "app"), ("container_id", CID),
           ("destination", "10.0.0.9:80"))
    for _ in range(2):
        f = Families({})
        t.collect(f)
        assert series(f, "container_net_tcp_successful_connects_total") == {}  # waits for the tick
        assert ct.resolved == 0 and len(t._pending) == 1
    t.tick(time.monotonic(), [])
    assert ct.resolved == 1
    f = Families({})
    t.collect(f)
    assert series(f, "container_net_tcp_successful_connects_total") == {lbl: 1}
    assert series(f, "container_net_tcp_bytes_sent_total") == {lbl: 300}  # live, from the map
    assert series(f, "container_net_tcp_active_connections") == {lbl: 1}
    t.handle_event(tcp_event(EV_CLOSE, 100, 5, sent=310, received=40))
    f = Families({})
    t.collect(f)
    assert series(f, "container_net_tcp_bytes_sent_total") == {lbl: 310}  # the close's final count
    assert series(f, "container_net_tcp_active_connections") == {lbl: 0}
    t.tick(time.monotonic(), [CID])  # the registry forgot the container: so does the tracker
    f = Families({})
    t.collect(f)
    assert list(f) == []
    t.close()
    assert ct.closed and t._live is None


# ------------------------------------------------------------------ TLS --

class Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def libssl_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A fake /proc with pid 7 mapping a libssl file that exists under its root."""
    procfs = tmp_path / "proc"
    lib = procfs / "7" / "root" / "usr" / "lib" / "libssl.so.3"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    (procfs / "7" / "maps").write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libssl.so.3\n")
    return str(procfs), tmp_path / "links"


def test_tls_attaches_entry_and_exit_through_programs_and_counts_what_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    procfs, links = libssl_process(tmp_path, monkeypatch)
    progs = FakePrograms(missing=("SSL_write_ex", "SSL_read_ex"))  # OpenSSL 1.1
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(links), pids=lambda: [7])
    t.attach(progs)
    assert [(a[1], a[2], a[3]) for a in progs.attached] == [
        ("SSL_write", "ssl_write_enter", False), ("SSL_write", "ssl_write_exit", True),
        ("SSL_read", "ssl_read_enter", False), ("SSL_read", "ssl_read_exit", True)]
    [lib] = t.libraries.values()
    assert lib.probes == 4 and lib.missing == ["SSL_write_ex", "SSL_read_ex"]
    f = Families({})
    t.self_metrics(f)
    assert series(f, "coroot_agent_tls_libraries") == {(): 1}


def test_tls_attaches_nothing_once_the_programs_close_and_does_not_call_it_a_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    procfs, links = libssl_process(tmp_path, monkeypatch)
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(links))
    t.attach(FakePrograms(closing=True))
    t.on_process("added", Proc(7))  # type: ignore[arg-type]
    t.tick(time.monotonic() + 10, [])  # both re-checks are due
    assert t.libraries == {} and t.failed == set()


def test_tls_queue_takes_listeners_from_two_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = tls_mod.TlsAttacher(procfs=str(tmp_path), link_dir=str(tmp_path / "links"))
    t.attach(FakePrograms())

    def add(base: int) -> None:
        for i in range(1000):
            t.on_process("added", Proc(base + i))  # type: ignore[arg-type]

    threads = [threading.Thread(target=add, args=(b,)) for b in (10_000, 20_000)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(t._queue) == 4000  # two re-checks for each of the 2,000 processes: none lost
    t.tick(time.monotonic() + 10, [])
    assert t._queue == []


# ------------------------------------------------------ rows by column --

class Rows:
    """A sink that keeps rows, checking their width against the table."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def add(self, table: str, row: tuple[Any, ...]) -> None:
        columns = schema.TABLES_BY_NAME[table].insert_columns
        assert len(row) == len(columns)
        self.rows.setdefault(table, []).append(dict(zip(columns, row, strict=True)))


class ProfRegistry(TcpRegistry):
    def opted_out(self, pid: int, what: str) -> bool:
        return False


def test_profiles_are_rows_named_by_column() -> None:
    rows = Rows()
    p = Profiler(ProfRegistry(), rows, frequency=100, interval=10, wall=lambda: 2.0, host_id="m1")  # type: ignore[arg-type]
    p._last_flush_ns = 1_000_000_000
    p._pending[CID][("leaf", "main")] = 3
    assert p.flush() == 3
    h = stack_hash(("leaf", "main"))
    service = service_name(CID)
    assert rows.rows["profiling_stacks"] == [
        {"ServiceName": service, "Hash": h, "LastSeen": 2_000_000_000, "Stack": ["leaf", "main"]}]
    assert rows.rows["profiling_samples"] == [
        {"ServiceName": service, "Type": PROFILE_TYPE, "Start": 1_000_000_000, "End": 2_000_000_000,
         "Labels": {"container.id": CID, "host.name": socket.gethostname(), "host.id": "m1"}, "StackHash": h,
         "Value": 3 * 10_000_000}]
    f = Families({})
    p.self_metrics(f)
    assert series(f, "coroot_agent_profiler_samples_total") == {(): 3}


def test_frames_are_stored_as_the_server_stores_the_node_agents() -> None:
    from agent.profiling.profiler import frame, frame_name

    assert frame("burn_alpha") == "burn_alpha :0"  # "%s %s:%d" of a name-only pprof line
    assert frame_name("burn_alpha :0") == "burn_alpha" and frame_name("f(int, char) a.c:12") == "f(int, char)"
    assert frame_name("/usr/lib/libc.so.6+2a1b :0") == "/usr/lib/libc.so.6+2a1b" and frame_name("main") == "main"


class LogRegistry(TcpRegistry):
    def container(self, cid: str) -> Container:
        return self.c


def test_log_records_are_rows_named_by_column_and_forgotten_with_their_container() -> None:
    rows = Rows()
    c = LogCollector(LogRegistry(), rows, journald=False, pods_dir="/nonexistent", docker_dir="/nonexistent")  # type: ignore[arg-type]
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    c._process(CID, "/var/log/app.log", f'{{"level": "error", "trace_id": "{tid}", "msg": "x"}}', 5, None)
    [row] = rows.rows["otel_logs"]
    assert row["Timestamp"] == 5 and row["TraceId"] == tid and row["SeverityText"] == "error"
    assert row["SeverityNumber"] == 17 and row["Body"].startswith('{"level"')
    assert row["ServiceName"] == service_name(CID) and set(row["LogAttributes"]) == {"pattern.hash"}
    assert row["ResourceAttributes"]["container.id"] == CID and row["TraceFlags"] == 0
    f = Families({})
    c.collect(f)
    assert sum(series(f, "container_log_messages_total").values()) == 1
    c.tick(time.monotonic(), [CID])  # the poll thread only hands it over...
    f = Families({})
    c.collect(f)
    assert sum(series(f, "container_log_messages_total").values()) == 1
    c._forget_gone()  # ...the logs thread forgets
    f = Families({})
    c.collect(f)
    assert series(f, "container_log_messages_total") == {} and c._patterns == {}


def test_metric_history_rows_are_named_by_column() -> None:
    reg = CollectorRegistry()
    Counter("hist_events", "events", registry=reg).inc(2)
    rows = Rows()
    MetricHistory(reg, rows, 15, "node-1").scrape(ts_ms=1234)  # type: ignore[arg-type]
    [row] = [r for r in rows.rows["metrics"] if r["MetricName"] == "hist_events_total"]
    assert row["Timestamp"] == 1234 and row["Value"] == 2.0
    assert row["Labels"] == {"instance": "node-1", "job": "coroot-node-agent"}


# ----------------------------------------------------------------- sink --

class FakeStore:
    """Inserts succeed (kept) or fail, as told; an embedded store gets the warm-up insert."""

    embedded = False

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.inserts: list[tuple[str, int]] = []

    def insert(self, table: str, columns: Any, rows: Any, token: str) -> None:
        if self.fail:
            raise StoreError("cannot reach ClickHouse")
        self.inserts.append((table, len(rows)))


def test_sink_close_writes_a_batch_of_every_table_however_many(tmp_path: Path) -> None:
    store = FakeStore()
    sink = Sink(store, Spool(str(tmp_path / "spool"), 1 << 20), max_pending=2)  # type: ignore[arg-type]
    for table in schema.WRITTEN:  # five tables, more than max_pending
        sink.add(table, schema.row(table, {}))
    sink.close()
    assert sorted(store.inserts) == sorted((t, 1) for t in schema.WRITTEN)
    assert len(sink.spool) == 0


def test_sealed_batches_waiting_for_the_store_are_bounded_by_rows_too(tmp_path: Path) -> None:
    """Batches of 50,000 rows: at most 100,000 rows wait in memory; the oldest go to the spool."""
    store = FakeStore(fail=True)
    sink = Sink(store, Spool(str(tmp_path / "spool"), 1 << 30), max_rows=50_000)  # type: ignore[arg-type]
    row = schema.row("otel_logs", {})
    for _ in range(3 * 50_000):
        sink.add("otel_logs", row)
    assert [len(b) for b in sink._ready] == [50_000, 50_000]
    assert sum(e.count for e in sink.spool._entries) == 50_000
    sink.add_columns("otel_logs", [[v] * 120_000 for v in row])  # one call past the bound: kept whole
    assert [len(b) for b in sink._ready] == [120_000]
    assert sum(e.count for e in sink.spool._entries) == 150_000


def test_sink_close_spools_at_once_while_the_store_is_failing(tmp_path: Path) -> None:
    store = FakeStore(fail=True)
    sink = Sink(store, Spool(str(tmp_path / "spool"), 1 << 20), backoff=(30.0, 60.0))  # type: ignore[arg-type]
    sink.add("otel_logs", schema.row("otel_logs", {}))
    sink.flush_once(force=True)  # fails: backoff for 30 s
    assert store.inserts == [] and sink.stats.errors == 1
    sink.add("otel_logs", schema.row("otel_logs", {}))
    store.fail = False  # it would answer now, but the backoff says not to wait for it at stop
    sink.close()
    assert store.inserts == [] and sum(e.count for e in sink.spool._entries) == 2


def test_an_embedded_store_is_warmed_up_with_an_empty_insert(tmp_path: Path) -> None:
    store = FakeStore()
    store.embedded = True
    sink = Sink(store, Spool(str(tmp_path / "spool"), 1 << 20))  # type: ignore[arg-type]
    sink.start()
    sink.close()
    assert store.inserts[0] == ("metrics", 0)


# ---------------------------------------------------------- the loader --

class FakeBcc:
    """The BPF object's probe bookkeeping; each detach waits like the kernel's grace periods."""

    def __init__(self, tracepoints: int, uprobes: int, wait: float) -> None:
        self.tracepoint_fds = {f"cat:tp{i}".encode(): i for i in range(tracepoints)}
        self.uprobe_fds = {f"p_lib_{i}".encode(): 100 + i for i in range(uprobes)}
        self.raw_tracepoint_fds: dict[bytes, int] = {}
        self.open_perf_events: dict[tuple[int, int], dict[int, int]] = {}
        self.funcs: dict[bytes, Any] = {}
        self.wait = wait
        self.cleaned = False
        self.attached: list[str] = []

    def detach_tracepoint(self, tp: bytes) -> None:
        time.sleep(self.wait)
        del self.tracepoint_fds[tp]

    def detach_uprobe_event(self, ev: bytes) -> None:
        time.sleep(self.wait)
        del self.uprobe_fds[ev]

    def attach_uprobe(self, name: str, sym: str, fn_name: str) -> None:
        self.attached.append(sym)

    def cleanup(self) -> None:
        assert not self.tracepoint_fds and not self.uprobe_fds  # all detached before
        self.cleaned = True


def test_probes_detach_side_by_side_and_nothing_attaches_after(monkeypatch: pytest.MonkeyPatch) -> None:
    bcc = FakeBcc(tracepoints=32, uprobes=8, wait=0.1)
    monkeypatch.setattr(loader, "_attach_uprobe",  # the real one resolves the symbol in the file
                        lambda bpf, path, symbol, addr, fn, ret, pid: bpf.attach_uprobe(path, symbol, fn))
    # the process the probes are handed to does not start: they are detached here, side by side
    loaded = loader.Loaded(bpf=bcc, families=("proc",), ringbuf=True, compile_seconds=1.0,
                           release=lambda fds, uprobes: False)
    loaded.attach_uprobe("/lib/libssl.so", "SSL_read", "ssl_read_enter")
    t0 = time.monotonic()
    loaded.begin_detach()
    assert time.monotonic() - t0 < 0.5  # returns at once (before the first 0.1 s detach ends, bar a loaded machine)
    with pytest.raises(ProgramsClosing):
        loaded.attach_uprobe("/lib/libssl.so", "SSL_write", "ssl_write_enter")
    loaded.close()
    took = time.monotonic() - t0
    assert bcc.cleaned and bcc.attached == ["SSL_read"]
    assert took < 2.0, f"40 detaches of 0.1 s took {took:.2f} s: not side by side"  # one by one: 4 s
    loaded.close()  # twice: nothing more
    with pytest.raises(KeyError):
        loaded.map("conns")
    f = Families({})
    loader.BpfStats(loaded).self_metrics(f)  # after close: nothing, no error
    assert list(f) == []


def test_probes_are_handed_to_a_process_that_closes_them_after_the_agent() -> None:
    """The real agent.ebpf.release, with pipes' write ends standing in for perf event
    descriptors: the agent's copies are closed at once, BCC forgets them, and the pipes reach
    end of file when that process, the last holder, has closed them too."""
    pipes = [os.pipe() for _ in range(3)]
    bcc = FakeBcc(tracepoints=0, uprobes=0, wait=0.0)
    bcc.tracepoint_fds = {b"cat:a": pipes[0][1], b"cat:b": pipes[1][1]}
    bcc.uprobe_fds = {b"p_lib_x": pipes[2][1]}
    loaded = loader.Loaded(bpf=bcc, families=("proc",), ringbuf=True, compile_seconds=1.0)
    loaded.begin_detach()
    assert not bcc.tracepoint_fds and not bcc.uprobe_fds
    for r, w in pipes:
        with pytest.raises(OSError):
            os.fstat(w)  # ours closed
        ready, _, _ = select.select([r], [], [], 20)
        assert ready and os.read(r, 1) == b""  # and the other process's: no writer left
        os.close(r)
    loaded.close()
    assert bcc.cleaned


# ------------------------------------------------------- remote write --

class Endpoint:
    """A remote-write endpoint on loopback that misbehaves as told: `hang` accepts and never
    answers; `cut` answers 500 promising a body it never sends, then hangs up."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            c.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += c.recv(65536)
            if self.mode == "cut":
                c.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000\r\n\r\npartial")
                c.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def endpoint(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    e = Endpoint(request.param)
    yield e
    e.close()


def writer(tmp_path: Path, port: int) -> RemoteWriter:
    reg = CollectorRegistry()
    Counter("rw_events", "events", registry=reg).inc()
    return RemoteWriter(f"http://127.0.0.1:{port}/api/v1/write", reg, Spool(str(tmp_path / "spool"), 1 << 24),
                        interval=0.2, backoff=(0.0, 0.0), timeout=10.0)


@pytest.mark.parametrize("endpoint", ["hang"], indirect=True)
def test_remote_write_close_is_bounded_by_its_deadline_and_keeps_the_request(
        endpoint: Endpoint, tmp_path: Path) -> None:
    w = writer(tmp_path, endpoint.port)
    w.start()
    time.sleep(0.3)  # the thread's first request now hangs in a 10 s timeout
    t0 = time.monotonic()
    w.close(deadline=1.0)
    assert time.monotonic() - t0 < 1.5
    assert len(w.spool) >= 2  # the first scrape and the last, kept for the next start


@pytest.mark.parametrize("endpoint", ["cut"], indirect=True)
def test_an_endpoint_that_hangs_up_mid_answer_is_retried_without_a_traceback(
        endpoint: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = writer(tmp_path, endpoint.port)
    w.scrape()
    with caplog.at_level(logging.DEBUG):
        w.send_pending()
    assert w.stats.failed > 0 and len(w.spool) == 1
    assert "500" in w.stats.last_error
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_a_client_that_hangs_up_on_the_writers_http_client_is_not_an_exception(tmp_path: Path) -> None:
    """The same from urllib's side with a real server that closes after the status line."""

    class Cut(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers["Content-Length"]))
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort")
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        w = writer(tmp_path, srv.server_address[1])
        w.scrape()
        w.send_pending()  # IncompleteRead on the body: an error to retry, not a crash
        assert w.stats.failed > 0 and len(w.spool) == 1
    finally:
        srv.shutdown()


def test_process_listener_signature_is_the_registrys() -> None:
    """Listeners get the registry's Process (the TLS attacher reads only its pid)."""
    p = Process(7, 0, "x", CID, CID, frozenset())
    t = tls_mod.TlsAttacher()
    t.on_process("added", p)
    assert [pid for _, pid in t._queue] == [7, 7]
