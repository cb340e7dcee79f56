"""L7 parsers on protocol bytes as clients and servers send them (built here byte by byte from
each wire format), and under hypothesis with random and truncated bytes: never an exception."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import dns, http, postgres, redis
from agent.l7.sql import mask_literals


def pg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def test_http_pipelined_requests_and_masked_query_values() -> None:
    data = (b"GET /api/users?id=42&token=abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer xyz\r\n\r\n"
            b"POST /orders HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /health HTTP/1.0\r\n\r\n")
    reqs = http.parse_requests(data)
    assert reqs == [http.Request("GET", "/api/users?id=*&token=*", "1.1"), http.Request("POST", "/orders", "1.1"),
                    http.Request("GET", "/health", "1.0")]
    assert "abc" not in repr(reqs) and "xyz" not in repr(reqs)
    resp = http.parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 404 Not Found\r\n\r\n")
    assert [r.status_class for r in resp] == ["2xx", "4xx"]
    assert http.parse_requests(b"GET / HTTP/1.1\r\nHost: trunc") == [http.Request("GET", "/", "1.1")]
    assert http.is_request(b"DELETE /x HTTP/1.1\r\n") and not http.is_request(b"\x16\x03\x01")


def test_postgres_simple_extended_prepared_and_errors() -> None:
    conn = postgres.Connection()
    simple = pg(b"Q", b"SELECT * FROM users WHERE name = 'bob' AND age > 30\0")
    assert postgres.parse_queries(simple, conn) == [
        postgres.Query("SELECT * FROM users WHERE name = ? AND age > ?", "simple")]
    parse = pg(b"P", b"s1\0SELECT $1::int + 5\0\0\0")
    bind = pg(b"B", b"\0s1\0\0\0\0\0\0\0")
    assert postgres.parse_queries(parse + pg(b"S", b""), conn) == []  # named: runs on Bind
    assert postgres.parse_queries(bind + pg(b"E", b"\0\0\0\0\0") + pg(b"S", b""), conn) == [
        postgres.Query("SELECT $1::int + ?", "extended")]
    unnamed = pg(b"P", b"\0UPDATE t SET x = 'secret'\0\0\0") + pg(b"B", b"\0\0\0\0\0\0\0\0")
    assert postgres.parse_queries(unnamed, conn) == [postgres.Query("UPDATE t SET x = ?", "extended")]
    err = pg(b"E", b"SERROR\0VERROR\0C42P01\0Mrelation \"nope\" does not exist\0\0")
    ok = pg(b"C", b"SELECT 1\0") + pg(b"Z", b"I")
    assert postgres.parse_results(ok) == [postgres.Result(False)]
    assert postgres.parse_results(err) == [postgres.Result(True, "42P01", 'relation "nope" does not exist')]
    password = pg(b"p", b"hunter2\0")
    assert postgres.is_startup_or_password(password) and postgres.parse_queries(password, conn) == []
    startup = struct.pack("!ii", 41, 196608) + b"user\0bob\0database\0app\0\0"
    assert postgres.parse_queries(startup, conn) == []


def test_redis_commands_pipelines_replies_and_masks() -> None:
    def cmd(*args: bytes) -> bytes:
        return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)

    data = cmd(b"SET", b"user:1", b"s3cr3t") + cmd(b"GET", b"user:1") + cmd(b"AUTH", b"default", b"pa55") + b"PING\r\n"
    got = redis.parse_commands(data)
    assert [c.statement for c in got] == ["SET user:1 ?", "GET user:1", "AUTH ? ?", "PING"]
    assert "s3cr3t" not in repr(got) and "pa55" not in repr(got)
    replies = redis.parse_replies(b"+OK\r\n$6\r\ns3cr3t\r\n-ERR wrong number of arguments\r\n:5\r\n*2\r\n$1\r\na\r\n_\r\n!10\r\nERR oops!!\r\n")
    assert [r.error for r in replies] == [False, False, True, False, False, True]


def dns_query(name: str, qtype: int, ident: int = 0x1234) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def test_dns_query_answer_nxdomain_and_tcp_framing() -> None:
    q = dns_query("api.example.com", 1)
    assert dns.parse(q) == dns.Message(0x1234, False, 0, "TypeA", "api.example.com", ())
    answer = struct.pack("!HHIH", 1, 1, 60, 4) + bytes([10, 0, 0, 7])
    resp = (struct.pack("!HHHHHH", 0x1234, 0x8180, 1, 1, 0, 0) + q[12:] + b"\xc0\x0c" + answer)
    m = dns.parse(resp)
    assert m is not None and m.response and m.rcode == 0 and m.ips == ("10.0.0.7",)
    nx = struct.pack("!HHHHHH", 7, 0x8183, 1, 0, 0, 0) + dns_query("nope.example", 28)[12:]
    m = dns.parse(struct.pack("!H", len(nx)) + nx, tcp=True)
    assert m is not None and (m.rcode, m.qtype, m.name) == (3, "TypeAAAA", "nope.example")


def test_sql_literals() -> None:
    assert mask_literals("SELECT 'it''s', 42, -3.5e2, x1 FROM t WHERE a = $$raw$$ AND b = X'ff'") == \
        "SELECT ?, ?, ?, x1 FROM t WHERE a = ? AND b = ?"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_no_parser_raises_on_random_bytes(data: bytes) -> None:
    http.parse_requests(data)
    http.parse_responses(data)
    postgres.parse_queries(data, postgres.Connection())
    postgres.parse_results(data)
    redis.parse_commands(data)
    redis.parse_replies(data)
    dns.parse(data)
    dns.parse(data, tcp=True)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=200))
def test_no_parser_raises_on_truncated_real_messages(cut: int) -> None:
    pgdata = pg(b"P", b"s1\0SELECT 1\0\0\0") + pg(b"E", b"SERROR\0C42P01\0Mx\0\0")
    for data in (b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n", pgdata,
                 b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", dns_query("a.example.org", 1)):
        part = data[:cut]
        http.parse_requests(part)
        postgres.parse_queries(part, postgres.Connection())
        postgres.parse_results(part)
        redis.parse_commands(part)
        redis.parse_replies(part)
        dns.parse(part)


def test_masks_can_be_switched_off_per_kind() -> None:
    assert http.parse_requests(b"GET /a?k=v HTTP/1.1\r\n\r\n", mask=False)[0].path == "/a?k=v"
    q = pg(b"Q", b"SELECT 'x', 1\0")
    assert postgres.parse_queries(q, mask=False) == [postgres.Query("SELECT 'x', 1", "simple")]
    assert redis.parse_commands(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", mask=False)[0].statement == "SET k v"


def test_postgres_status_from_the_first_reply_bytes() -> None:
    from agent.l7.postgres import status_of as pg_status

    assert pg_status(pg(b"1", b"") + pg(b"2", b"") + pg(b"T", b"\0\0")) == ("ok", "")
    assert pg_status(pg(b"1", b"") + pg(b"E", b"SERROR\0C22012\0Mdivision by zero\0\0")) == ("failed", "22012")
    assert pg_status(b"\x16\x03\x01garbage") == ("unknown", "")


def test_histogram_is_cumulative_and_kernel_sampling_threshold() -> None:
    from agent.l7.hist import Hist
    from agent.l7.tracer import L7Tracer

    h = Hist()
    for s in (0.001, 0.004, 0.02, 3.0, 60.0):
        h.observe(s)
    cum = dict(h.cumulative())
    assert cum["0.005"] == 2 and cum["0.025"] == 3 and cum["5.0"] == 4 and cum["+Inf"] == 5
    assert L7Tracer.kernel_sampling(True, 1.0) == 2**32 and L7Tracer.kernel_sampling(True, 0.25) == 2**30
    assert L7Tracer.kernel_sampling(False, 1.0) == 0


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=600), st.binary(max_size=600))
def test_the_tracer_turns_any_request_and_response_bytes_into_requests_or_nothing(proto: int, req: bytes,
                                                                                  resp: bytes) -> None:
    from agent.l7.protocol import Settings
    from agent.l7.protocols import PLUGINS

    plugin = {cls.id: cls for cls in PLUGINS}[proto](Settings())
    for r in plugin.parse((1, 3, 5), req, resp, 0.001):
        assert r.status in ("1xx", "2xx", "3xx", "4xx", "5xx", "ok", "failed", "unknown", "", *dns.RCODES.values())
    plugin.record("/c", plugin.parse((1, 3, 5), req, resp, 0.001))
