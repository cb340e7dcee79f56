"""ZooKeeper (jute, as ZooKeeper's zookeeper.jute defines it): each message is a 4-byte length,
then its body. A request's header is (xid, op code), a reply's (xid, zxid, err); the reply to a
request carries its xid. The kernel (bpf/include/l7/zookeeper.h) recognises a request written
whole by a client, or as a bare body: written or read after its length on its own (ZooKeeper's
server and the C client do that), and pairs it with the next call in the other direction; a
reply's length read on its own (the Java and C clients read it first) is waited past, so the
reply's header comes bare in the call after it.

Counted as the node agent counts them: status "failed" for the system errors (err -1..-9) and
ReconfigDisabled (-123), "ok" for every other reply, API errors such as NoNode (-101) or
NodeExists (-110) included; pings (xid -2) count, the session's ConnectRequest and watch
notifications (xid -1) do not. The statuses are only these two, as the node agent's: a watch
notification read in the reply's place answers the request with its err (0), as the node agent
takes it; a call without a reply header, or a reply with another xid, means the pair is not
ZooKeeper's, and it is not counted. Spans: named after the op, with the znode path in db.statement (data is never kept)
and the err in zookeeper.status_code."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from agent.l7 import contract
from agent.l7 import protocol as p

_INT = struct.Struct("!i")
_REPLY = struct.Struct("!iqi")  # xid, zxid, err

PING_XID, NOTIFICATION_XID = -2, -1
# op code -> name, as ZooKeeper's ZooDefs.OpCode spells them (the node agent's span names)
OPS: dict[int, str] = {
    1: "create", 2: "delete", 3: "exists", 4: "getData", 5: "setData", 6: "getAcl", 7: "setAcl",
    8: "getChildren", 9: "sync", 11: "ping", 12: "getChildren2", 13: "check", 14: "multi", 15: "create2",
    17: "checkWatches", 18: "removeWatches", 19: "createContainer", 20: "deleteContainer", 21: "createTTL",
    22: "multiRead", 103: "getEphemerals", 104: "getAllChildrenNumber", 106: "addWatch", -11: "close",
}
PATH_OPS = frozenset(OPS) - {11, 14, 22, -11}  # ops whose record begins with the znode path
MULTI_OPS = frozenset({14, 22})
# err codes (KeeperException.Code) for span messages
ERRORS: dict[int, str] = {
    -1: "SystemError", -2: "RuntimeInconsistency", -3: "DataInconsistency", -4: "ConnectionLoss",
    -5: "MarshallingError", -6: "Unimplemented", -7: "OperationTimeout", -8: "BadArguments",
    -13: "NewConfigNoQuorum", -14: "ReconfigInProgress", -15: "UnknownSession", -100: "APIError",
    -101: "NoNode", -102: "NoAuth", -103: "BadVersion", -108: "NoChildrenForEphemerals", -110: "NodeExists",
    -111: "NotEmpty", -112: "SessionExpired", -113: "InvalidCallback", -114: "InvalidACL", -115: "AuthFailed",
    -118: "SessionMoved", -119: "NotReadOnly", -120: "EphemeralOnLocalSession", -121: "NoWatcher",
    -122: "RequestTimeout", -123: "ReconfigDisabled", -124: "SessionClosedRequireSaslAuth",
    -125: "QuotaExceeded", -127: "Throttled",
}
MIN_ERR = -127  # the lowest err ZooKeeper defines: below it, or above 0, it is not a reply
MAX_PATH = 1024  # a longer path is not shown (as the node agent does)
TRUNCATED = "...<TRUNCATED>"


# Captured from ZooKeeper 3.8's server and a jute client (the contract test runs the kernel's
# detector on them)
CONNECT = bytes.fromhex("0000002d00000000000000000000000000007530000000000000000000000010"
                        "0000000000000000000000000000000000")
CREATE = bytes.fromhex("000000380000000100000001000000082f63612d7a6b2d300000000176000000010000001f0000"
                       "0005776f726c6400000006616e796f6e6500000000")
GET_DATA = bytes.fromhex("000000150000000300000004000000082f63612d7a6b2d3000")
GET_DATA_REPLY = bytes.fromhex("000000590000000300000000000000210000000000000001760000000000000020000000"
                               "0000000020000001a23fd98e82000001a23fd98e8200000000000000000000000000000000"
                               "0000000000000001000000000000000000000020")
PING = bytes.fromhex("00000008fffffffe0000000b")
CLOSE = bytes.fromhex("0000000800000009fffffff5")
MULTI = bytes.fromhex("0000004a000000070000000e0000000100ffffffff000000082f63612d7a6b2d6d000000017600"
                      "0000010000001f00000005776f726c6400000006616e796f6e6500000000ffffffff01ffffffff")
NOTIFICATION = bytes.fromhex("00000024ffffffffffffffffffffffff000000000000000100000003000000082f63612d7a6b2d77")


@dataclass(frozen=True)
class Call:
    """A request: its xid, op code, the name a span shows and the znode path."""

    xid: int
    op: int
    name: str
    path: str


@dataclass(frozen=True)
class Reply:
    xid: int
    err: int


def status_of(err: int) -> str:
    """The metric's status for a reply's err, as the node agent maps it."""
    return "failed" if -9 <= err <= -1 or err == -123 else "ok"


def _path(data: bytes, pos: int, end: int) -> str | None:
    """The ustring at pos, in a record that ends at `end` (-1: unknown): None when it is not a
    path; cut short by the capture, its start."""
    if pos + 4 > len(data):
        return None
    (n,) = _INT.unpack_from(data, pos)
    if n <= 0 or 0 <= end < pos + 4 + n:
        return None
    if n > MAX_PATH:
        return ""
    raw = data[pos + 4:pos + 4 + n]
    if not raw:
        return ""
    if raw[:1] != b"/":
        return None
    text = raw.decode("utf-8", errors="replace")
    return text if len(raw) == n else text + TRUNCATED


def _body(data: bytes, pos: int, size: int) -> Call | None:
    """The request whose body (header first) starts at data[pos] and has `size` bytes (-1: as
    many as there are)."""
    if pos + 8 > len(data):
        return None
    xid, op = struct.unpack_from("!ii", data, pos)
    if size == 8 or len(data) - pos == 8 and size < 0:
        if xid == PING_XID and op == 11 or xid >= 0 and op == -11:
            return Call(xid, op, OPS[op], "")
        return None
    if xid < 0:
        return None
    end = pos + size if size >= 0 else -1
    if op in MULTI_OPS:  # the first op's header (type, done, err -1), then its record
        if pos + 17 > len(data):
            return None
        first, done = struct.unpack_from("!i?", data, pos + 8)
        if first not in PATH_OPS or done:
            return None
        path = _path(data, pos + 17, end)
        return Call(xid, op, f"{OPS[op]}({OPS[first]}, ...)", path or "")
    if op not in PATH_OPS:
        return None
    path = _path(data, pos + 8, end)
    if path is None:
        return None
    return Call(xid, op, OPS[op], path)


def parse_request(data: bytes) -> list[Call]:
    """What a request's first bytes may be: the framed request (a client's write) and the bare
    body (what ZooKeeper's server reads after the length); the reply's xid tells them apart."""
    out: list[Call] = []
    try:
        if len(data) >= 4:
            (n,) = _INT.unpack_from(data, 0)
            if n >= 8:
                framed = _body(data, 4, n)
                if framed is not None:
                    out.append(framed)
        bare = _body(data, 0, -1)
        if bare is not None:
            out.append(bare)
    except (struct.error, ValueError):
        return out
    return out


def parse_replies(data: bytes) -> list[Reply]:
    """The reply headers of the framed messages in a response's first bytes, in order, up to
    the first that is not one."""
    out: list[Reply] = []
    pos = 0
    try:
        while pos + 20 <= len(data):
            (n,) = _INT.unpack_from(data, pos)
            if n < 16:
                break
            xid, _zxid, err = _REPLY.unpack_from(data, pos + 4)
            if not MIN_ERR <= err <= 0 or xid < 0 and xid not in (PING_XID, NOTIFICATION_XID):
                break
            out.append(Reply(xid, err))
            pos += 4 + n
    except struct.error:
        return out
    return out


def reply_to(calls: list[Call], response: bytes) -> tuple[Call, Reply] | None:
    """The request and its reply: the first reply in the response that is not a watch
    notification, or else a bare reply header (a client that read the length alone first),
    if its xid is one of the request's readings; a notification alone answers the first
    reading. None when the response holds no reply to it: not a ZooKeeper pair."""
    if not calls:
        return None
    framed = parse_replies(response)
    replies = [r for r in framed if r.xid != NOTIFICATION_XID]
    if not framed and len(response) >= 16:
        xid, _zxid, err = _REPLY.unpack_from(response, 0)
        if MIN_ERR <= err <= 0 and (xid >= 0 or xid == PING_XID):
            replies = [Reply(xid, err)]
    if not replies:
        return (calls[0], framed[0]) if framed else None
    for call in calls:
        if call.xid == replies[0].xid:
            return call, replies[0]
    return None


class Zookeeper(p.Protocol):
    id = contract.ZOOKEEPER
    name = "zookeeper"
    stem = p.Stem("zookeeper", "requests")
    kernel_requests = (
        GET_DATA, GET_DATA[4:],  # framed, as a client writes it; the body, as the server reads it
        PING, PING[4:], CLOSE, CREATE, CREATE[4:], MULTI, MULTI[4:],
        bytes.fromhex("0000000e0000000300000003000000012f00"),  # exists /, a path of one byte
    )
    kernel_non_requests = (
        CONNECT, CONNECT[4:], CONNECT[:4],  # the session's ConnectRequest; the length the server reads first
        NOTIFICATION, GET_DATA_REPLY,  # what the server writes
        bytes.fromhex("0000001cfffffff800000065" + "00" * 20),  # setWatches (xid -8)
        GET_DATA[:-1],  # framed, the length past the call
        bytes.fromhex("0000000400000004000000202f63612d7a6b2d30"),  # a path longer than the call
        bytes.fromhex("000000030000000400000007" "63612d7a6b2d3000"),  # a path without its slash
        bytes.fromhex("0000001a00000007000000010010") + b"console-producer",  # a Kafka Produce v7 header
        b"*1\r\n$4\r\nPING\r\n", b"GET / HTTP/1.1\r\n\r\n", b"Q\0\0\0\x0eSELECT 1;\0",
    )

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        try:
            found = reply_to(parse_request(request), response)
        except (struct.error, ValueError):
            return []
        if found is None:
            return []
        call, reply = found
        statement = f"{call.name} {call.path}" if call.path else call.name
        return [p.Request(self.id, status_of(reply.err), seconds, call.name, call.path, reply.err,
                          statement=statement, error=ERRORS.get(reply.err, str(reply.err)) if reply.err else "")]

    def sample_response(self, request: bytes) -> bytes:
        """A framed reply (err 0) to the request's first reading: a request without one is not counted."""
        calls = parse_request(request)
        return struct.pack("!i", 16) + _REPLY.pack(calls[0].xid, 0, 0) if calls else b""

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        s = p.Span(r.method, {"db.system": "zookeeper", "db.operation": r.method, "db.statement": r.statement})
        s.attributes["zookeeper.status_code"] = str(r.code)
        if r.status == "failed":
            s.status, s.message = "STATUS_CODE_ERROR", r.error
        return s
