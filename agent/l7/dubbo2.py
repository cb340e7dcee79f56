"""Dubbo2, Apache Dubbo's "dubbo" protocol (the Dubbo2 TCP protocol spec of dubbo.apache.org).

Every message is a 16-byte header and its body. The header: magic 0xdabb; a flag byte — request
(0x80), two-way (0x40), event (0x20: heartbeats), the serialization id in the low 5 bits (2 is
Hessian2, the default); a status byte (a response's: 20 is OK); the request id (int64); the
body's length (int32), all big-endian. A request's body, in its serialization: the Dubbo
version, the service path (its interface), the service version, the method name, the parameter
types, the arguments and the attachments; a response's: a value or an exception for OK, else an
error message.

A client has many requests in flight on one connection, answered in any order by request id: a
Dubbo2 connection is a stream connection (contract.h), every read and write comes to `feed`,
framed by the header's length (agent/l7/framing.py), and a two-way request waits under its id
(at most MAX_PENDING per connection) until the response with that id. Heartbeats (events) and
one-way requests are not counted, as the node agent counts them.

Status, as the node agent's: "ok" for 20; "failed" for the codes Dubbo defines for errors (client
and server timeout, bad request and response, service not found, service error, server and
client error, thread pool exhausted); "unknown" for any other byte. An OK response that carries
an exception thrown by the service is "ok" (only the status byte says). The service and method
are read from Hessian2 bodies only. Spans (the node agent makes none for Dubbo2): named
"<service>/<method>" with rpc.system "apache_dubbo", rpc.service and rpc.method (OTel's RPC
conventions), a failure's status name (SERVICE_NOT_FOUND, ...) as the error message; only for
requests whose service and method were read."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from agent.l7 import contract
from agent.l7 import protocol as p
from agent.l7.framing import Framer

MAGIC = b"\xda\xbb"
HEADER = 16
F_REQUEST, F_TWO_WAY, F_EVENT, SERIALIZATION = 0x80, 0x40, 0x20, 0x1F
HESSIAN2 = 2
OK = 20
FAILED = {30: "CLIENT_TIMEOUT", 31: "SERVER_TIMEOUT", 40: "BAD_REQUEST", 50: "BAD_RESPONSE",
          60: "SERVICE_NOT_FOUND", 70: "SERVICE_ERROR", 80: "SERVER_ERROR", 90: "CLIENT_ERROR",
          100: "SERVER_THREADPOOL_EXHAUSTED_ERROR"}
MAX_BODY = 2**31 - 1
MAX_PENDING = 1024  # requests of one connection waiting for their responses (the oldest go first)
MAX_CONNECTIONS = 4096  # connections followed (the least recently used go first)
MAX_NAME = 256  # characters kept of a service or method name


class Short(Exception):
    """The bytes end before the value."""


@dataclass(frozen=True)
class Header:
    flags: int
    status: int
    request_id: int
    length: int  # the body's

    @property
    def request(self) -> bool:
        return bool(self.flags & F_REQUEST)

    @property
    def two_way(self) -> bool:
        return bool(self.flags & F_TWO_WAY)

    @property
    def event(self) -> bool:
        return bool(self.flags & F_EVENT)

    @property
    def serialization(self) -> int:
        return self.flags & SERIALIZATION


def header(data: bytes) -> Header | None:
    """A message's header from its first 16 bytes, or None when they are not one."""
    if len(data) < HEADER or data[:2] != MAGIC or not data[2] & SERIALIZATION:
        return None
    length = int.from_bytes(data[12:16], "big", signed=True)
    if length < 0:
        return None
    return Header(data[2], data[3], int.from_bytes(data[4:12], "big"), length)


def _frame_size(head: bytes) -> int | None:
    h = header(head)
    return None if h is None else HEADER + h.length


def hessian_string(data: bytes, pos: int) -> tuple[str | None, int]:
    """A Hessian2 string (or null) at `pos`: (its value, the position after it). Raises Short
    when it runs past `data`, ValueError when the byte there begins no string."""
    out: list[str] = []
    while True:
        if pos >= len(data):
            raise Short
        code = data[pos]
        if code == 0x4E:  # 'N': null
            return None, pos + 1
        final = True
        if code <= 0x1F:
            n, pos = code, pos + 1
        elif 0x30 <= code <= 0x33:
            if pos + 2 > len(data):
                raise Short
            n, pos = ((code - 0x30) << 8) | data[pos + 1], pos + 2
        elif code in (0x52, 0x53):  # 'R': a chunk with more to come, 'S': the last one
            if pos + 3 > len(data):
                raise Short
            n, pos, final = int.from_bytes(data[pos + 1:pos + 3], "big"), pos + 3, code == 0x53
        else:
            raise ValueError(f"no Hessian2 string at {pos}: 0x{code:02x}")
        pos = _utf8_chars(data, pos, n, out)
        if final:
            return "".join(out), pos


def _utf8_chars(data: bytes, pos: int, n: int, out: list[str]) -> int:
    """`n` UTF-16 units of (modified) UTF-8 from `pos` appended to `out`; the position after."""
    while n > 0:
        if pos >= len(data):
            raise Short
        lead = data[pos]
        width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if pos + width > len(data):
            raise Short
        out.append(data[pos:pos + width].decode("utf-8", "replace"))
        pos += width
        n -= 2 if width == 4 else 1
    return pos


@dataclass(frozen=True)
class Call:
    service: str
    method: str


def parse_call(h: Header, body: bytes) -> Call:
    """A request's service and method from its body's first bytes ("" where not read)."""
    if h.serialization != HESSIAN2:
        return Call("", "")
    try:
        pos = 0
        values: list[str] = []
        for _ in range(4):  # Dubbo version, service path, service version, method
            s, pos = hessian_string(body, pos)
            values.append(s or "")
        return Call(values[1][:MAX_NAME], values[3][:MAX_NAME])
    except (Short, ValueError):
        return Call("", "")


def status_of(code: int) -> str:
    if code == OK:
        return "ok"
    return "failed" if code in FAILED else "unknown"


@dataclass
class Pending:
    call: Call
    ts_ns: int


@dataclass
class Connection:
    client: Framer = field(default_factory=lambda: Framer(HEADER, _frame_size))
    server: Framer = field(default_factory=lambda: Framer(HEADER, _frame_size))
    pending: OrderedDict[int, Pending] = field(default_factory=OrderedDict)  # by request id


def message(flags: int, request_id: int, body: bytes = b"", status: int = 0) -> bytes:
    """A message's bytes (samples and tests)."""
    return MAGIC + bytes([flags, status]) + request_id.to_bytes(8, "big") + len(body).to_bytes(4, "big") + body


def hessian(s: str | None) -> bytes:
    """A Hessian2 string (ASCII and BMP characters; samples and tests)."""
    if s is None:
        return b"N"
    raw, n = s.encode(), len(s)
    if n <= 0x1F:
        return bytes([n]) + raw
    if n <= 0x3FF:
        return bytes([0x30 + (n >> 8), n & 0xFF]) + raw
    return b"S" + n.to_bytes(2, "big") + raw


def request(request_id: int, service: str, method: str, types: str = "Ljava/lang/String;",
            args: bytes = b"\x05hello", flags: int = F_REQUEST | F_TWO_WAY | HESSIAN2) -> bytes:
    """A Hessian2 invocation as Dubbo's codec writes it, with empty attachments."""
    body = hessian("2.0.2") + hessian(service) + hessian("0.0.0") + hessian(method) + hessian(types) + args + b"HZ"
    return message(flags, request_id, body)


def response(request_id: int, status: int = OK, body: bytes = b"\x91\x05hello") -> bytes:
    """A response: OK with a value (Hessian2 int 1: RESPONSE_VALUE, then the value) by default."""
    return message(HESSIAN2, request_id, body, status)


class Dubbo2(p.Protocol):
    id = contract.DUBBO2
    name = "dubbo2"
    stem = p.Stem("dubbo", "requests")
    streaming = True
    kernel_requests = (
        request(1, "org.apache.dubbo.demo.DemoService", "sayHello"),
        request(2, "com.example.Greeter", "greet") + request(3, "com.example.Greeter", "greet"),  # two at once
        request(4, "com.example.Greeter", "greet")[:16],  # the header written (or read) on its own
        request(5, "com.example.Greeter", "greet", flags=F_REQUEST | F_TWO_WAY | 23),  # fastjson2
        message(F_REQUEST | F_TWO_WAY | HESSIAN2, 6),  # an empty body
    )
    kernel_non_requests = (
        response(1),  # a response
        response(1, 70, hessian("boom")),
        message(F_REQUEST | F_TWO_WAY | F_EVENT | HESSIAN2, 7, b"N"),  # a heartbeat
        request(8, "com.example.Greeter", "greet", flags=F_REQUEST | HESSIAN2),  # one-way
        request(9, "com.example.Greeter", "greet", flags=F_REQUEST | F_TWO_WAY),  # no serialization id
        request(10, "com.example.Greeter", "greet")[:-1],  # longer than the call
        request(11, "com.example.Greeter", "greet")[:15],
        b"\xda\xbc" + request(12, "a.B", "c")[2:],  # not the magic
        message(F_REQUEST | F_TWO_WAY | HESSIAN2, 13)[:12] + b"\x80\0\0\0",  # a negative length
    )

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._conns: OrderedDict[p.ConnKey, Connection] = OrderedDict()

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        return []  # a stream protocol: see feed

    def feed(self, conn: p.ConnKey, client: bool, ts_ns: int, data: bytes, size: int) -> list[p.Request]:
        c = self._conns.get(conn)
        if c is None:
            c = self._conns[conn] = Connection()
            if len(self._conns) > MAX_CONNECTIONS:
                self._conns.popitem(last=False)
        else:
            self._conns.move_to_end(conn)
        out: list[p.Request] = []
        try:
            for f in (c.client if client else c.server).feed(data, size, ts_ns):
                h = header(f.data)
                if h is None or h.event:
                    continue
                if client and h.request and h.two_way:
                    c.pending[h.request_id] = Pending(parse_call(h, f.data[HEADER:]), f.ts_ns)
                    c.pending.move_to_end(h.request_id)
                    if len(c.pending) > MAX_PENDING:
                        c.pending.popitem(last=False)
                elif not client and not h.request:
                    waiting = c.pending.pop(h.request_id, None)
                    if waiting is not None:
                        out.append(p.Request(self.id, status_of(h.status), max(f.ts_ns - waiting.ts_ns, 0) / 1e9,
                                             waiting.call.method, path=waiting.call.service,
                                             error=FAILED.get(h.status, "") if h.status != OK else "",
                                             code=h.status, start_ns=waiting.ts_ns))
        except (Short, ValueError, IndexError):  # garbage in: this direction starts over
            if client:
                c.client = Framer(HEADER, _frame_size)
            else:
                c.server = Framer(HEADER, _frame_size)
        return out

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        if not r.path or not r.method:
            return None
        s = p.Span(f"{r.path}/{r.method}", {"rpc.system": "apache_dubbo", "rpc.service": r.path,
                                             "rpc.method": r.method})
        if r.status == "failed":
            s.status, s.message = "STATUS_CODE_ERROR", r.error
        return s

    def forget(self, containers: set[str]) -> None:
        """Connections go with their LRU bound; nothing is kept per container."""
