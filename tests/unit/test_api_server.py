"""The HTTP API server against real sockets on loopback (and a unix socket): refusals before the
body, timeouts, the connection cap, a slow handler, clients that go away, keep-alive, IPv6, and
who may use the unix socket. No BPF; the agent's collectors are not involved."""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from agent.api.server import ApiServer, Refusal, Request, Response, body_length, parse_head

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
KEY = "t0p-s3cret"

UNIX_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(type(e).__name__, e.errno)
    sys.exit(0)
s.sendall(b"GET /api/echo HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while True:
    more = s.recv(65536)
    if not more:
        break
    data += more
print(data.split(b"\\r\\n", 1)[0].decode())
"""


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class Calls:
    def __init__(self) -> None:
        self.n = 0
        self.bodies: list[bytes] = []


def make(host: str = "127.0.0.1", api_key: str = KEY, **kw: object) -> tuple[ApiServer, Calls]:
    reg = CollectorRegistry()
    srv = ApiServer(host, 0, reg, api_key, **kw)  # type: ignore[arg-type]
    reg.register(srv.collector())
    calls = Calls()

    def echo(query: str, body: bytes) -> Response:
        calls.n += 1
        calls.bodies.append(body)
        return Response(200, json.dumps({"query": query, "len": len(body)}).encode())

    srv.route("/api/echo", echo)
    srv.start()
    return srv, calls


@pytest.fixture
def server() -> Iterator[tuple[ApiServer, Calls]]:
    srv, calls = make(header_timeout=2.0, body_timeout=2.0)
    yield srv, calls
    srv.stop()


def get(port: int, path: str, host: str = "127.0.0.1", headers: dict[str, str] | None = None,
        method: str = "GET", body: bytes | None = None, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def timed(port: int, path: str) -> tuple[int, float]:
    t = time.monotonic()
    status, _ = get(port, path)
    return status, time.monotonic() - t


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def flood_body(port: int, head: bytes, limit: int = 64 << 20, seconds: float = 20) -> tuple[bytes, int]:
    """Send `head`, then body bytes as fast as the server takes them, until an answer arrives:
    (the answer's first bytes, body bytes sent by then)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head)
    s.setblocking(False)
    chunk = b"A" * 65536
    sent, answer = 0, b""
    t = time.monotonic()
    try:
        while sent < limit and time.monotonic() - t < seconds:
            try:
                answer = s.recv(4096)
                if answer:
                    break
            except BlockingIOError:
                pass
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
        s.setblocking(True)
        s.settimeout(5)
        while answer and b"\r\n\r\n" not in answer:
            more = s.recv(4096)
            if not more:
                break
            answer += more
    except OSError:
        pass
    finally:
        s.close()
    return answer, sent


def raw(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 5) -> bytes:
    """Send `data`, half-close, read everything until the server closes."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            more = s.recv(65536)
            if not more:
                return out
            out += more


# ------------------------------------------------------------------ parsing --


def test_parse_head_reads_a_request_and_refuses_garbage_without_raising() -> None:
    req = parse_head(b"POST /api/query?format=json HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX-A: 1\r\nx-a: 2")
    assert isinstance(req, Request)
    assert (req.method, req.path, req.query, req.version) == ("POST", "/api/query", "format=json", "HTTP/1.1")
    assert req.headers == {"host": "x", "content-length": "12", "x-a": "1, 2"}
    assert body_length(req) == 12 and req.keep_alive
    for head, status in ((b"GET / HTTP/2.0", 505), (b"GET / FOO/1.1", 400), (b"GET /", 400),
                         (b"GET http://x/ HTTP/1.1", 400), (b"GET /\xff HTTP/1.1", 400), (b"G\x00T / HTTP/1.1", 400),
                         (b"GET / HTTP/1.1\r\n folded", 400), (b"GET / HTTP/1.1\r\nBad Name: 1", 400),
                         (b"GET / HTTP/1.1\r\nA: \x01", 400),
                         (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", 400),
                         (b"GET / HTTP/1.1" + b"\r\nA: b" * 101, 431), (b"\xff\xfe" * 9000, 431), (b"", 400)):
        r = parse_head(head)
        assert isinstance(r, Refusal) and r.status == status, (head[:40], r)
    for cl, want in (("-1", 400), ("abc", 400), ("1e3", 400), ("\u00b2", 400), ("9" * 19, 400)):
        r = parse_head(f"POST / HTTP/1.1\r\nContent-Length: {cl}".encode("latin-1"))
        assert isinstance(r, Request)
        got = body_length(r)
        assert isinstance(got, Refusal) and got.status == want
    r = parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked")
    assert isinstance(r, Request)
    te = body_length(r)
    assert isinstance(te, Refusal) and te.status == 501
    r10 = parse_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive")
    assert isinstance(r10, Request) and r10.keep_alive
    r10 = parse_head(b"GET / HTTP/1.0")
    assert isinstance(r10, Request) and not r10.keep_alive and body_length(r10) is None


# ------------------------------------------------------------ the endpoints --


def test_metrics_healthz_404_405_and_the_request_counts(server: tuple[ApiServer, Calls]) -> None:
    srv, _ = server
    assert get(srv.port, "/healthz") == (200, b"ok\n")
    assert get(srv.port, "/nope")[0] == 404
    assert get(srv.port, "/metrics", method="POST", body=b"")[0] == 405
    status, text = get(srv.port, "/metrics")
    assert status == 200
    # Counted before this scrape: 200, 404, 405.
    assert b'coroot_agent_api_requests_total{code="2xx"} 1.0' in text
    assert b'coroot_agent_api_requests_total{code="4xx"} 2.0' in text
    assert b"coroot_agent_api_connections_evicted_total 0.0" in text


def test_tcp_api_needs_the_key_from_loopback_too(server: tuple[ApiServer, Calls]) -> None:
    srv, calls = server
    assert get(srv.port, "/api/echo")[0] == 401
    assert get(srv.port, "/api/echo", headers={"X-Api-Key": "wrong"})[0] == 401
    assert get(srv.port, "/api/echo", headers={"X-Api-Key": KEY + "x"})[0] == 401
    assert get(srv.port, "/api/missing", headers={"X-Api-Key": KEY})[0] == 404
    status, body = get(srv.port, "/api/echo?a=1", headers={"X-Api-Key": KEY}, method="POST", body=b"hello")
    assert status == 200 and json.loads(body) == {"query": "a=1", "len": 5}
    assert calls.n == 1


def test_without_an_api_key_the_tcp_api_is_403_and_names_the_socket(tmp_path: object) -> None:
    d = tempfile.mkdtemp(prefix="ca-api-")
    path = os.path.join(d, "api.sock")
    srv, calls = make(api_key="", unix_path=path)
    try:
        status, body = get(srv.port, "/api/echo", headers={"X-Api-Key": ""})
        assert status == 403
        msg = json.loads(body)["error"]
        assert "api_key" in msg and path in msg
        assert get(srv.port, "/metrics")[0] == 200 and get(srv.port, "/healthz")[0] == 200
        assert calls.n == 0
    finally:
        srv.stop()
        shutil.rmtree(d)


# ------------------------------------------------------- refused before body --


@pytest.mark.parametrize(("claim", "want"), [("-1", 400), ("1073741824", 413), ("abc", 400), (None, 411)])
def test_a_bad_huge_or_missing_content_length_is_refused_before_the_body(server: tuple[ApiServer, Calls],
                                                                         claim: str | None, want: int) -> None:
    srv, calls = server
    before = rss_kb()
    length = "" if claim is None else f"Content-Length: {claim}\r\n"
    head = f"POST /api/echo HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n{length}\r\n".encode()
    answer, sent = flood_body(srv.port, head)
    assert answer.startswith(f"HTTP/1.1 {want} ".encode()), answer[:80]
    assert b"Connection: close" in answer
    assert sent < 64 << 20, "the server kept reading a body it refused"
    assert rss_kb() - before < 8 * 1024
    assert calls.n == 0


def test_an_unauthenticated_gigabyte_is_refused_401_before_the_body(server: tuple[ApiServer, Calls]) -> None:
    srv, calls = server
    before = rss_kb()
    answer, sent = flood_body(srv.port, b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]
    assert sent < 64 << 20
    assert rss_kb() - before < 8 * 1024
    assert calls.n == 0


def test_missing_length_and_transfer_encoding_and_big_heads_are_refused(server: tuple[ApiServer, Calls]) -> None:
    srv, calls = server
    k = f"X-Api-Key: {KEY}\r\n"
    assert status_of(raw(srv.port, f"POST /api/echo HTTP/1.1\r\n{k}\r\n".encode())) == 411
    assert status_of(raw(srv.port, f"POST /api/echo HTTP/1.1\r\n{k}Transfer-Encoding: chunked\r\n\r\n"
                                   "5\r\nhello\r\n0\r\n\r\n".encode())) == 501
    assert status_of(raw(srv.port, f"POST /api/echo HTTP/1.1\r\n{k}Content-Length: 2000000\r\n\r\n".encode())) == 413
    assert status_of(raw(srv.port, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")) == 431
    assert status_of(raw(srv.port, b"GET /healthz HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n")) == 431
    assert status_of(raw(srv.port, b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")) == 400
    # Exactly at the cap is fine.
    body = b"x" * (1 << 20)
    status, text = get(srv.port, "/api/echo", headers={"X-Api-Key": KEY}, method="POST", body=body)
    assert status == 200 and json.loads(text)["len"] == 1 << 20
    assert calls.n == 1


# ------------------------------------------------------------------ timeouts --


def test_slowloris_headers_are_cut_at_the_header_timeout(server: tuple[ApiServer, Calls]) -> None:
    srv, _ = server  # header_timeout=2
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    t = time.monotonic()
    answer = b""
    try:
        for b in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            s.sendall(bytes([b]))
            s.settimeout(1.0)
            try:
                answer = s.recv(4096)
            except TimeoutError:
                continue
            break
    except OSError:
        pass
    took = time.monotonic() - t
    s.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 1.8 < took < 3.5
    assert srv.stats.timeouts["header"] == 1


def test_a_slow_body_is_cut_at_the_body_timeout(server: tuple[ApiServer, Calls]) -> None:
    srv, calls = server  # body_timeout=2
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(f"POST /api/echo HTTP/1.1\r\nX-Api-Key: {KEY}\r\nContent-Length: 100\r\n\r\n0123456789".encode())
        t = time.monotonic()
        answer = s.recv(4096)
        took = time.monotonic() - t
    assert answer.startswith(b"HTTP/1.1 408 ") and 1.8 < took < 3.5
    assert srv.stats.timeouts["body"] == 1 and calls.n == 0


def test_an_idle_keepalive_connection_is_closed_at_the_idle_timeout() -> None:
    srv, _ = make(idle_timeout=1.0)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        assert conn.sock is not None
        t = time.monotonic()
        assert conn.sock.recv(10) == b""  # closed by the server
        assert 0.8 < time.monotonic() - t < 2.5
        assert srv.stats.timeouts["idle"] == 1
        conn.close()
    finally:
        srv.stop()


# ------------------------------------------------- the connection cap, floods --


def test_a_thousand_half_open_connections_do_not_stop_healthz_or_metrics() -> None:
    srv, _ = make(max_connections=256)
    socks: list[socket.socket] = []
    try:
        before = rss_kb()
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        deadline = time.monotonic() + 10
        while srv.stats.accepted < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The oldest that never finished a request made room for the newer ones.
        assert srv.stats.accepted == 1000
        assert srv.stats.evicted == 1000 - 256 and srv.open_connections() == 256
        assert srv.stats.refused == 0
        healths, metrics = [], []
        for i in range(20):
            status, took = timed(srv.port, "/healthz")
            assert status == 200
            healths.append(took)
            if i % 5 == 0:
                status, took = timed(srv.port, "/metrics")
                assert status == 200
                metrics.append(took)
        assert max(healths) < 0.1, healths
        assert max(metrics) < 1.0, metrics
        # The first probe took the place of a half-open connection; later ones usually find the
        # slot the previous probe left (unless they arrive before its close was seen).
        assert 1000 - 256 + 1 <= srv.stats.evicted <= 1000 - 256 + 24
        assert srv.stats.refused == 0
        assert rss_kb() - before < 20 * 1024
        # The evicted ones were closed: their clients see the end of the stream.
        closed = 0
        for s in socks[:100]:
            s.settimeout(2)
            try:
                closed += s.recv(100) == b""
            except OSError:
                closed += 1
        assert closed == 100
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_clients_that_do_not_read_their_answer_make_room_and_busy_slots_refuse() -> None:
    srv, _ = make(max_connections=4, workers=4)
    srv.route("/api/big", lambda q, b: Response(200, b"x" * (16 << 20), "text/plain"))
    release = threading.Event()
    entered: list[int] = []

    def wait(q: str, b: bytes) -> Response:
        entered.append(1)
        release.wait(10)
        return Response(200, b"done\n")

    srv.route("/api/wait", wait)
    socks: list[socket.socket] = []
    try:
        for _ in range(4):  # each asks for 16 MB and reads none of it
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"GET /api/big HTTP/1.1\r\nX-Api-Key: {KEY}\r\n\r\n".encode())
            socks.append(s)
        time.sleep(0.5)
        assert srv.open_connections() == 4
        status, took = timed(srv.port, "/healthz")
        assert status == 200 and took < 0.1
        assert srv.stats.evicted == 1 and srv.stats.refused == 0
        for s in socks:
            s.close()
        socks.clear()
        # Four requests inside a handler: nothing can be closed for a fifth, which is refused.
        waiting = [threading.Thread(target=get, args=(srv.port, "/api/wait"),
                                    kwargs={"headers": {"X-Api-Key": KEY}, "timeout": 10}) for _ in range(4)]
        for th in waiting:
            th.start()
        deadline = time.monotonic() + 5
        while len(entered) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(entered) == 4 and srv.open_connections() == 4
        with pytest.raises(OSError):
            get(srv.port, "/healthz", timeout=2)
        assert srv.stats.refused == 1
        release.set()
        for th in waiting:
            th.join(10)
        assert srv.stats.requests["2xx"] == 4 + 1 + 4  # the unread answers count as sent
        assert get(srv.port, "/healthz")[0] == 200
    finally:
        release.set()
        for s in socks:
            s.close()
        srv.stop()


def test_a_slow_handler_does_not_delay_healthz_or_metrics(server: tuple[ApiServer, Calls]) -> None:
    srv, _ = server
    release = threading.Event()
    srv.route("/api/slow", lambda q, b: (release.wait(3), Response(200, b"slow\n"))[1])
    results: list[tuple[int, bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(get(srv.port, "/api/slow",
                                                                    headers={"X-Api-Key": KEY}, timeout=10)))
               for _ in range(4)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    time.sleep(0.3)
    for _ in range(10):
        status, took = timed(srv.port, "/healthz")
        assert status == 200 and took < 0.1
        status, took = timed(srv.port, "/metrics")
        assert status == 200 and took < 1.0
    for th in threads:
        th.join(10)
    assert results == [(200, b"slow\n")] * 4
    assert time.monotonic() - t0 >= 2.9  # the handlers really ran for 3 s


def test_a_full_handler_queue_answers_503() -> None:
    srv, _ = make(workers=1, queue_size=1)
    release = threading.Event()
    started = threading.Event()

    def slow(q: str, b: bytes) -> Response:
        started.set()
        release.wait(5)
        return Response(200, b"done\n")

    srv.route("/api/slow", slow)
    results: list[int] = []
    try:
        first = threading.Thread(target=lambda: results.append(get(srv.port, "/api/slow", headers={"X-Api-Key": KEY})[0]))
        first.start()
        assert started.wait(5)
        second = threading.Thread(target=lambda: results.append(get(srv.port, "/api/slow", headers={"X-Api-Key": KEY})[0]))
        second.start()
        time.sleep(0.3)  # queued behind the first
        assert get(srv.port, "/api/slow", headers={"X-Api-Key": KEY})[0] == 503
        release.set()
        first.join(5)
        second.join(5)
        assert sorted(results) == [200, 200]
        assert srv.stats.busy["handler"] == 1
    finally:
        release.set()
        srv.stop()


# ----------------------------------------------- clients that go away, reuse --


def test_a_client_that_hangs_up_mid_response_leaves_no_traceback(server: tuple[ApiServer, Calls],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    srv, _ = server
    srv.route("/api/big", lambda q, b: Response(200, b"x" * (16 << 20), "text/plain"))
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET /api/big HTTP/1.1\r\nX-Api-Key: {KEY}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200 ")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        s.close()
    # And going away at other moments: mid-head, mid-body, before the answer of /metrics.
    for data in (b"GET /hea", f"POST /api/echo HTTP/1.1\r\nX-Api-Key: {KEY}\r\nContent-Length: 9\r\n\r\nabc".encode(),
                 b"GET /metrics HTTP/1.1\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(data)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    time.sleep(0.5)
    assert get(srv.port, "/healthz")[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_keepalive_serves_two_requests_on_one_connection_and_http10_works(server: tuple[ApiServer, Calls]) -> None:
    srv, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("GET", "/healthz")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"ok\n"
    sock = conn.sock
    conn.request("POST", "/api/echo", body=b"abc", headers={"X-Api-Key": KEY})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["len"] == 3
    assert conn.sock is sock  # the same connection
    conn.close()
    assert srv.stats.accepted == 1
    # Pipelined, on one connection, then HTTP/1.0 closes unless asked not to.
    out = raw(srv.port, b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 2
    out = raw(srv.port, b"GET /healthz HTTP/1.0\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 1 and b"Connection: close" in out
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in first
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_ipv6_loopback() -> None:
    srv, calls = make(host="::1")
    try:
        assert srv.host == "::1"
        assert get(srv.port, "/healthz", host="::1") == (200, b"ok\n")
        assert get(srv.port, "/api/echo", host="::1")[0] == 401
        assert get(srv.port, "/api/echo", host="::1", headers={"X-Api-Key": KEY})[0] == 200
    finally:
        srv.stop()
    srv, _ = make(host="[::]")
    try:
        assert get(srv.port, "/healthz", host="::1")[0] == 200
        assert get(srv.port, "/healthz", host="127.0.0.1")[0] == 200  # dual stack
    finally:
        srv.stop()


def test_stop_is_quick_with_connections_open_and_a_handler_running() -> None:
    srv, _ = make()
    srv.route("/api/slow", lambda q, b: (time.sleep(3), Response(200, b""))[1])
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(50)]
    for s in socks[:10]:
        s.sendall(f"GET /api/slow HTTP/1.1\r\nX-Api-Key: {KEY}\r\n\r\n".encode())
    time.sleep(0.3)
    t = time.monotonic()
    srv.stop()
    assert time.monotonic() - t < 1.0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
    for s in socks:
        s.close()


# ---------------------------------------------------------------- the socket --


def unix_get(path: str, target: str = "/api/echo") -> int:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        more = s.recv(65536)
        if not more:
            break
        data += more
    s.close()
    return status_of(data)


def as_nobody(path: str) -> str:
    r = subprocess.run([*NOBODY, sys.executable, "-c", UNIX_CLIENT, path], capture_output=True, text=True,
                       timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ca-api-")
    os.chmod(d, 0o755)  # nobody may reach the socket file itself
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_the_unix_socket_is_roots_and_peercred_is_checked_again(sockdir: str) -> None:
    assert os.geteuid() == 0, "this test runs as root, as the agent does"
    path = os.path.join(sockdir, "api.sock")
    srv, calls = make(unix_path=path)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        assert unix_get(path) == 200 and calls.n == 1  # root, no key
        assert as_nobody(path) == "PermissionError 13"
        os.chmod(path, 0o666)  # someone loosened it: the peer check still says no
        assert as_nobody(path) == "HTTP/1.1 403 Forbidden"
        assert calls.n == 1
        assert unix_get(path, "/healthz") == 200
    finally:
        srv.stop()
    assert not os.path.exists(path)


def test_the_socket_group_may_use_it(sockdir: str) -> None:
    path = os.path.join(sockdir, "api.sock")
    srv, calls = make(unix_path=path, unix_group="65534")
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0 and st.st_gid == 65534
        assert as_nobody(path) == "HTTP/1.1 200 OK" and calls.n == 1
    finally:
        srv.stop()


def test_the_socket_is_created_safely(sockdir: str) -> None:
    path = os.path.join(sockdir, "api.sock")
    # A stale socket (nobody serves it) is replaced.
    old = socket.socket(socket.AF_UNIX)
    old.bind(path)
    old.close()
    srv, _ = make(unix_path=path)
    try:
        assert unix_get(path, "/healthz") == 200
        # A live one is not.
        with pytest.raises(OSError, match="another process serves"):
            ApiServer("127.0.0.1", 0, CollectorRegistry(), unix_path=path)
    finally:
        srv.stop()
    # Something that is not a socket is never removed.
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(OSError, match="not a socket"):
        ApiServer("127.0.0.1", 0, CollectorRegistry(), unix_path=path)
    assert open(path).read() == "keep me"
    os.unlink(path)
    # A directory anyone can write to, without the sticky bit, is refused.
    os.chmod(sockdir, 0o777)
    with pytest.raises(OSError, match="writable by every user"):
        ApiServer("127.0.0.1", 0, CollectorRegistry(), unix_path=path)
    assert not os.path.exists(path)
    # A port that is taken fails in the constructor, and the unix socket is not left behind.
    os.chmod(sockdir, 0o755)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(OSError):
            ApiServer("127.0.0.1", taken.getsockname()[1], CollectorRegistry(), unix_path=path)
        assert not os.path.exists(path)
    finally:
        taken.close()
