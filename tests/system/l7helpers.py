"""Shared by the L7 system tests (tests/system/test_l7*.py): the agent's L7 series read by
status or method, waits for exact counts, the spans the store holds for a container, the
agent's own L7 counters for a failure's message, a test server in its own cgroup and a wire
client's start and finish."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from tests.system.helpers import (
    REPO,
    AgentProcess,
    TestCgroups,
    free_port,
    rows,
    wait_for,
    wait_port,
)
from tests.system.servers import Nginx

# the L7 families a container's traffic can make (requests, queries, messages; any protocol)
L7_FAMILY = re.compile(r"container_\w+_(requests|queries|messages)_")


def by_status(agent: AgentProcess, name: str, **labels: str) -> dict[str, float]:
    """Series `name` with `labels` (a subset of theirs), summed by status."""
    out: dict[str, float] = {}
    for n, lb, v in agent.metrics():
        if n == name and labels.items() <= lb.items():
            out[lb["status"]] = out.get(lb["status"], 0) + v
    return out


def by_method(agent: AgentProcess, name: str, **labels: str) -> dict[tuple[str, str], float]:
    """Series `name` with `labels`, summed by (method, status) (NATS and RabbitMQ)."""
    out: dict[tuple[str, str], float] = {}
    for n, lb, v in agent.metrics():
        if n == name and labels.items() <= lb.items():
            key = (lb.get("method", ""), lb["status"])
            out[key] = out.get(key, 0) + v
    return out


def delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """What `after` counts beyond `before`, its zero entries left out."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def wait_counts(agent: AgentProcess, name: str, total: float | Mapping[str, float], *,
                before: Mapping[str, float] | None = None, settle: float = 0.0, timeout: float = 30,
                **labels: str) -> dict[str, float]:
    """by_status() once its counts add up to `total` (or to the sum of a wanted dict), less
    what `before` held (then only the statuses that changed). With `settle`, read again that
    many seconds later: the counts are then what came, and nothing more."""
    want = sum(total.values()) if isinstance(total, Mapping) else total
    base = before or {}

    def read() -> dict[str, float]:
        return delta(by_status(agent, name, **labels), base) if before is not None else by_status(agent, name, **labels)

    got: dict[str, float] = {}

    def done() -> bool:
        nonlocal got
        got = read()
        return sum(got.values()) >= want

    wait_for(done, timeout, interval=0.2)
    if settle:
        time.sleep(settle)
        got = read()
    return got


def wait_methods(agent: AgentProcess, name: str, total: int, **labels: str) -> dict[tuple[str, str], float]:
    """by_method() once its counts add up to `total`."""
    got: dict[tuple[str, str], float] = {}

    def done() -> bool:
        nonlocal got
        got = by_method(agent, name, **labels)
        return sum(got.values()) >= total

    wait_for(done, 30, interval=0.2)
    return got


def histogram_count(agent: AgentProcess, name: str, **labels: str) -> float:
    """The observations of histogram `name` in the series with `labels`."""
    return sum(v for n, lb, v in agent.metrics() if n == name + "_count" and labels.items() <= lb.items())


SPAN_COLUMNS = "SpanName, SpanKind, SpanAttributes, Duration, StatusCode, StatusMessage, ResourceAttributes"


def spans(agent: AgentProcess, service: str, want: int, *, settle: float = 0.0,
          where: str | None = None) -> list[dict[str, Any]]:
    """The stored spans of ServiceName `service` (or of the `where` condition) once there are
    `want` of them (or 30 s passed). With `settle`, read again that many seconds later (the
    store is written every second): what came, and nothing more."""
    sql = f"SELECT {SPAN_COLUMNS} FROM otel_traces WHERE " + (where or f"ServiceName = '{service}'")
    got: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal got
        got = rows(agent, sql)
        return len(got) >= want

    wait_for(enough, 30, interval=0.5)
    if settle:
        time.sleep(settle)
        got = rows(agent, sql)
    return got


def span_count(agent: AgentProcess, *services: str) -> int:
    """Stored spans of these containers (by container id)."""
    ids = ", ".join(f"'{c}'" for c in services)
    return int(rows(agent, f"SELECT count() AS n FROM otel_traces WHERE ResourceAttributes['container.id'] IN ({ids})")
               [0]["n"])


def diagnosis(agent: AgentProcess) -> dict[str, float]:
    """The agent's own L7 counters (kernel pairs, replaced requests, lost events), for a failure's message."""
    return {f"{n}{{{lb.get('what', '')}}}": v for n, lb, v in agent.metrics()
            if n.startswith("coroot_agent_l7_") or n == "coroot_agent_lost_events_total"}


def assert_messages_only(agent: AgentProcess, family: str, clients: Sequence[str], server_cid: str) -> None:
    """NATS and RabbitMQ as the node agent has them: the clients' containers and the server's
    have no L7 family but `family` (no histogram, no other protocol), the server's side is not
    counted (no inbound family) and no spans are made."""
    names = {n for n, lb, _ in agent.metrics() if lb.get("container_id") in (*clients, server_cid)}
    assert {n for n in names if L7_FAMILY.match(n)} <= {family}, names
    assert by_method(agent, family, container_id=server_cid) == {}
    assert span_count(agent, *clients) == 0


# ------------------------------------------------------------------ servers and clients --

@dataclass
class CgroupServer:
    """A test server on loopback in its own cgroup."""

    port: int
    cid: str  # the server's container
    dir: str  # its working directory (server.log)
    proc: subprocess.Popen[bytes]

    @property
    def dest(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def cgroup_server(name: str, argv: Callable[[int, str], Sequence[str]], *, timeout: float = 30,
                  prepare: Callable[[int, str], None] | None = None) -> Iterator[CgroupServer]:
    """Start `argv(port, workdir)` in a new cgroup on a free port with a temporary working
    directory (`prepare(port, workdir)` first), its output in workdir/server.log, until it
    accepts on the port; everything in the cgroup is killed and the directory removed after."""
    cg = TestCgroups()
    cid = cg.create(name)
    port = free_port()
    workdir = tempfile.mkdtemp(prefix=f"ca-{name}-")
    try:
        if prepare is not None:
            prepare(port, workdir)
        with open(os.path.join(workdir, "server.log"), "wb") as log:  # the child has its own copy
            p = cg.spawn(cid, argv(port, workdir), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port("127.0.0.1", port, timeout=timeout, proc=p)
        except RuntimeError:
            with open(os.path.join(workdir, "server.log"), errors="replace") as f:
                raise RuntimeError(f"{name} did not start:\n{f.read()[-4000:]}") from None
        yield CgroupServer(port, cid, workdir, p)
    finally:
        cg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def start_client(cgroups: TestCgroups, cid: str, argv: Sequence[str], what: str) -> tuple[subprocess.Popen[str], Any]:
    """Run a wire client in a test cgroup (stdin and stdout piped, from the repository) and
    read the JSON line it prints first; it then waits for finish()."""
    p = cast("subprocess.Popen[str]", cgroups.spawn(cid, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     text=True, cwd=REPO))
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the {what} client failed (exit {p.wait(10)})"
    return p, json.loads(line)


def finish(p: subprocess.Popen[str], timeout: float = 10) -> None:
    """Close a client's stdin (it exits) and wait for it."""
    assert p.stdin is not None
    p.stdin.close()
    p.wait(timeout)


@contextmanager
def nginx_in(cgroups: TestCgroups, name: str) -> Iterator[tuple[Nginx, str]]:
    """nginx (plain and TLS ports) in a new test cgroup: (server, container id); stopped after."""
    cid = cgroups.create(name)
    n = Nginx()
    try:
        n.start(cgroups, cid)
        yield n, cid
    finally:
        n.stop()


def answers(s: CgroupServer) -> list[dict[str, Any]]:
    """A responder's answers in order: the JSON lines of its server.log (which also holds the
    interpreter's messages, if any)."""
    with open(f"{s.dir}/server.log") as f:
        return [json.loads(line) for line in f.read().splitlines() if line.startswith("{")]


@dataclass(frozen=True)
class RequestFamilies:
    """A protocol's request families: counters and histograms, outbound and inbound."""

    stem: str  # container_<stem>_requests_total ...

    @property
    def out(self) -> str:
        return f"container_{self.stem}_requests_total"

    @property
    def inbound(self) -> str:
        return f"container_{self.stem}_inbound_requests_total"

    @property
    def hist_out(self) -> str:
        return f"container_{self.stem}_requests_duration_seconds_total"

    @property
    def hist_in(self) -> str:
        return f"container_{self.stem}_inbound_requests_duration_seconds_total"


@contextmanager
def answered_client(agent: AgentProcess, cgroups: TestCgroups, server: CgroupServer, families: RequestFamilies,
                    name: str, argv: Sequence[str], what: str, status: Callable[[dict[str, Any]], str],
                    want: Mapping[str, int]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Run a wire client (`argv`, in a new test cgroup `name`) against a responder that logs each
    answer (answers()); the client's own counts, the answers by `status(answer)` and the agent's
    counters and histograms on both sides are all exactly `want`. Yields (the client's container,
    its answers) while the client is still connected; finishes the client after."""
    before = by_status(agent, families.inbound, container_id=server.cid)
    before_hist = histogram_count(agent, families.hist_in, container_id=server.cid)
    seen = len(answers(server))
    cid = cgroups.create(name)
    p, result = start_client(cgroups, cid, argv, what)
    try:
        assert result["counts"] == want
        mine = answers(server)[seen:]
        expected = dict(Counter(status(a) for a in mine))
        assert expected == want
        total = len(mine)
        got_in = wait_counts(agent, families.inbound, settle=1, total=sum(before.values()) + total,
                             container_id=server.cid)
        assert delta(got_in, before) == expected, (mine, diagnosis(agent))
        got_out = wait_counts(agent, families.out, settle=1, total=total, container_id=cid, destination=server.dest,
                              actual_destination=server.dest)
        assert got_out == expected, (mine, diagnosis(agent))
        assert histogram_count(agent, families.hist_out, container_id=cid, destination=server.dest) == total
        assert histogram_count(agent, families.hist_in, container_id=server.cid) - before_hist == total
        yield cid, mine
    finally:
        finish(p)


class ReadyClient:
    """A TLS client the tests built (Go, rustls): started with `argv`, it connects, prints
    {"ready": true} and waits; run() makes its requests and returns the JSON line it prints;
    finish() lets it exit."""

    def __init__(self, cgroups: TestCgroups, cid: str, argv: Sequence[str], what: str) -> None:
        self.what = what
        self.proc = cgroups.spawn(cid, list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self) -> dict:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the {self.what} client failed (exit {self.proc.wait()})"
        return json.loads(line)  # type: ignore[no-any-return]

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        self.proc.wait(10)


def tls_diagnostics(agent: AgentProcess, cid: str) -> str:
    """What the agent knows of the container and its own L7 counters, for a failure message."""
    lines = [f"{n}{lb} {v}" for n, lb, v in agent.metrics()
             if lb.get("container_id") == cid or n.startswith(("coroot_agent_l7", "coroot_agent_lost", "coroot_agent_tls"))]
    return "\n".join(lines + [line for line in agent.log().splitlines() if "WARNING" in line or "ERROR" in line])


def check_tls_client_side(agent: AgentProcess, cid: str, port: int, ok: int, missing: int) -> None:
    """A TLS client's `ok` requests to /ok (200) and `missing` to /missing (404) over one
    connection to 127.0.0.1:port: counted exactly, a span each with tls="true"."""
    want = {"2xx": ok, "4xx": missing}
    dest = f"127.0.0.1:{port}"
    assert wait_counts(agent, "container_http_requests_total", want, container_id=cid) == want, tls_diagnostics(agent, cid)
    assert by_status(agent, "container_http_requests_total", container_id=cid, destination=dest,
                     actual_destination=dest) == want
    got = spans(agent, cid, ok + missing)
    assert len(got) == ok + missing, tls_diagnostics(agent, cid)
    urls: dict[tuple[str, str], int] = {}
    for s in got:
        attrs = s["SpanAttributes"]
        assert s["SpanName"] == "GET" and s["SpanKind"] == "SPAN_KIND_CLIENT"
        assert attrs["tls"] == "true" and attrs["net.peer.port"] == str(port)
        key = (attrs["http.url"], attrs["http.status_code"])
        urls[key] = urls.get(key, 0) + 1
    assert urls == {(f"https://{dest}/ok", "200"): ok, (f"https://{dest}/missing", "404"): missing}
