"""MongoDB wire protocol: every message is a 16-byte header of little-endian int32s
(messageLength, requestID, responseTo, opCode) and its body.

Requests (responseTo 0): OP_MSG (2013: flagBits, then sections; kind 0 is the command document,
kind 1 a document sequence), the legacy OP_QUERY (2004: flags, the full collection name, skip,
limit, the query document: old drivers' commands and every driver's first handshake) and
OP_COMPRESSED (2012, either of them compressed: counted, its command unread). Replies: OP_MSG
and OP_REPLY (1: responseFlags, cursorID, startingFrom, numberReturned, documents).

A `hello`/`isMaster` handshake (a driver's connection set-up and its server monitoring) is not
a query, as the node agent, which does not count the OP_QUERY a driver starts with, does not.

Status from the reply's document: "ok" when its `ok` is 1 and it carries no writeErrors or
writeConcernError, "failed" otherwise (the error's code is the span's message); an OP_REPLY with
QueryFailure or `$err` failed; "unknown" when the reply's document was not seen (a driver that
reads the 16-byte header alone first: the kernel pairs the request with that read). A reply
may also come as its body alone (the read after such a header), told from a whole message by
its header's responseTo, which names the request.

The statement is the command document as relaxed JSON with its values masked (`?`): keys, the
command's collection and `$db` stay; the session and cluster-time fields are left out."""

from __future__ import annotations

import struct

from agent.l7 import contract
from agent.l7 import protocol as p

OP_REPLY, OP_QUERY, OP_COMPRESSED, OP_MSG = 1, 2004, 2012, 2013
HEADER = struct.Struct("<iiii")
HANDSHAKES = frozenset({"hello", "ismaster"})
CHECKSUM_PRESENT, MORE_TO_COME = 1, 2
QUERY_FAILURE = 2  # OP_REPLY responseFlags
TRUNCATED = "..."
MAX_DEPTH = 8  # nested documents shown; deeper ones become {...}
OMIT = frozenset({"lsid", "$clusterTime", "txnNumber", "$readPreference", "signature"})
KEEP = frozenset({"$db"})  # top-level fields whose value stays


class Truncated(Exception):
    """The document ends past the captured bytes."""


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        raise Truncated
    return data[pos:end].decode("utf-8", "replace"), end + 1


def _i32(data: bytes, pos: int) -> int:
    if pos + 4 > len(data):
        raise Truncated
    return int.from_bytes(data[pos:pos + 4], "little", signed=True)


_FIXED = {1: 8, 6: 0, 7: 12, 8: 1, 9: 8, 10: 0, 16: 4, 17: 8, 18: 8, 19: 16, 0x7F: 0, 0xFF: 0}


class Doc:
    """A BSON document decoded as far as the bytes go: (key, type, value) items, values of
    scalars as Python values where they are needed (numbers, strings), nested documents as Doc."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int, object]] = []
        self.truncated = False

    def get(self, key: str) -> object:
        for k, _, v in self.items:
            if k == key:
                return v
        return None


def decode(data: bytes, pos: int = 0, depth: int = 0) -> tuple[Doc, int]:
    """The document at `pos` and the position after it; a truncated document is returned with
    what was read (`truncated`)."""
    doc = Doc()
    size = _i32(data, pos) if pos + 4 <= len(data) else -1
    if size == -1:
        doc.truncated = True
        return doc, len(data)
    if size < 5:
        raise ValueError("bad document size")
    end = pos + size
    i = pos + 4
    try:
        while True:
            if i >= len(data):
                raise Truncated
            t = data[i]
            if t == 0:
                return doc, i + 1
            key, i = _cstring(data, i + 1)
            value: object = None
            if t in _FIXED:
                n = _FIXED[t]
                if i + n > len(data):
                    raise Truncated
                raw = data[i:i + n]
                if t == 1:
                    value = struct.unpack("<d", raw)[0]
                elif t == 16:
                    value = int.from_bytes(raw, "little", signed=True)
                elif t == 18:
                    value = int.from_bytes(raw, "little", signed=True)
                elif t == 8:
                    value = raw != b"\0"
                i += n
            elif t in (2, 13, 14):  # string, code, symbol
                n = _i32(data, i)
                if n < 1:
                    raise ValueError("bad string")
                if i + 4 + n > len(data):
                    raise Truncated
                value = data[i + 4:i + 3 + n].decode("utf-8", "replace")
                i += 4 + n
            elif t in (3, 4):  # document, array
                if depth >= MAX_DEPTH:
                    n = _i32(data, i)
                    if n < 5:
                        raise ValueError("bad document")
                    value, i = Doc(), i + n
                    value.truncated = True
                else:
                    value, i = decode(data, i, depth + 1)
                    if value.truncated:
                        doc.items.append((key, t, value))
                        doc.truncated = True
                        return doc, len(data)
            elif t == 5:  # binary
                n = _i32(data, i)
                if n < 0:
                    raise ValueError("bad binary")
                i += 5 + n
            elif t == 11:  # regex: pattern, options
                _, i = _cstring(data, i)
                _, i = _cstring(data, i)
            elif t == 12:  # DBPointer
                n = _i32(data, i)
                if n < 1:
                    raise ValueError("bad string")
                i += 4 + n + 12
            elif t == 15:  # code with scope
                n = _i32(data, i)
                if n < 14:
                    raise ValueError("bad code with scope")
                i += n
            else:
                raise ValueError(f"BSON type {t}")
            if i > len(data):
                raise Truncated
            if i > end:
                raise ValueError("element past the document's end")
            doc.items.append((key, t, value))
    except Truncated:
        doc.truncated = True
        return doc, len(data)


def _json(doc: Doc, keep_first: bool, top: bool, mask: bool) -> str:
    parts = []
    for n, (key, t, value) in enumerate(doc.items):
        if top and key in OMIT:
            continue
        if isinstance(value, Doc):
            inner = _json(value, False, False, mask) if value.items or not value.truncated else TRUNCATED
            shown = f"[{inner[1:-1]}]" if t == 4 else inner
        elif (not mask or (keep_first and n == 0) or (top and key in KEEP)) and t == 2:
            shown = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        elif not mask and t in (1, 16, 18):
            shown = repr(value) if t == 1 else str(value)
        elif not mask and t == 8:
            shown = "true" if value else "false"
        elif (keep_first and n == 0) and t in (1, 16, 18, 8):
            shown = "1" if value else "0"  # {count: 1}-style commands: their value says nothing
        else:
            shown = "?"
        parts.append(f'"{key}": {shown}')
    if doc.truncated:
        parts.append(TRUNCATED)
    return "{" + ", ".join(parts) + "}"


def statement(doc: Doc, mask: bool = True) -> str:
    """The command document as a statement: values masked (`mask`), the command's collection
    and $db kept, session and cluster time left out."""
    return _json(doc, True, True, mask)


class Command:
    def __init__(self, name: str, text: str, request_id: int, op: int, more_to_come: bool = False) -> None:
        self.name = name
        self.text = text
        self.request_id = request_id
        self.op = op
        self.more_to_come = more_to_come


def parse_request(data: bytes, mask: bool = True) -> Command | None:
    """The command in a request message (header included), None when it is not one; a message
    whose body was not captured (a server reading the header alone) is a command of unknown name."""
    try:
        if len(data) < 16:
            return None
        length, req, response_to, op = HEADER.unpack_from(data)
        if response_to != 0 or length < 16 or op not in (OP_MSG, OP_QUERY, OP_COMPRESSED):
            return None
        if op == OP_COMPRESSED or len(data) == 16:
            return Command("", "", req, op)
        if op == OP_MSG:
            if len(data) < 21:
                return Command("", "", req, op)
            flags = int.from_bytes(data[16:20], "little")
            pos = 20
            while pos < len(data) and data[pos] == 1:  # document sequences before the body
                n = _i32(data, pos + 1)
                if n < 5:
                    return None
                pos += 1 + n
            if pos >= len(data):
                return Command("", TRUNCATED, req, op, bool(flags & MORE_TO_COME))
            if data[pos] != 0:
                return None
            doc, _ = decode(data, pos + 1)
            more = bool(flags & MORE_TO_COME)
        else:
            coll, pos = _cstring(data, 20)
            doc, _ = decode(data, pos + 8)
            more = False
            if not coll.endswith(".$cmd"):  # a legacy query on a collection: find
                q = Doc()
                q.items = [("find", 2, coll), ("filter", 3, doc)]
                q.truncated = doc.truncated
                doc = q
        name = doc.items[0][0] if doc.items else ""
        return Command(name, statement(doc, mask), req, op, more)
    except (Truncated, ValueError, struct.error, IndexError):
        return None


class Reply:
    def __init__(self, status: str, error: str = "") -> None:
        self.status = status
        self.error = error


def _status(doc: Doc) -> Reply:
    ok = doc.get("ok")
    code = doc.get("code")
    if isinstance(ok, (int, float)) and not isinstance(ok, bool) and ok != 1:
        return Reply("failed", str(code) if isinstance(code, int) else "")
    we = doc.get("writeErrors")
    if isinstance(we, Doc) and we.items:
        first = we.items[0][2]
        c = first.get("code") if isinstance(first, Doc) else None
        return Reply("failed", str(c) if isinstance(c, int) else "")
    wce = doc.get("writeConcernError")
    if isinstance(wce, Doc):
        c = wce.get("code")
        return Reply("failed", str(c) if isinstance(c, int) else "")
    if doc.get("$err") is not None:
        return Reply("failed", str(code) if isinstance(code, int) else "")
    if ok is None:
        return Reply("unknown")
    return Reply("ok")


def parse_reply(data: bytes, request_id: int | None = None, op: int = OP_MSG) -> Reply:
    """The status of a reply to the request `request_id` (of opcode `op`): its message with
    the header, or, when the header was read on its own (a driver reads it first), its body."""
    try:
        if len(data) >= 16:
            _len, _req, response_to, reply_op = HEADER.unpack_from(data)
            if response_to != 0 and (request_id is None or response_to == request_id):
                return _reply_body(data[16:], reply_op)
        if request_id is None:
            return Reply("unknown")
        return _reply_body(data, OP_REPLY if op == OP_QUERY else OP_MSG)
    except (Truncated, ValueError, struct.error, IndexError):
        return Reply("unknown")


def _reply_body(body: bytes, op: int) -> Reply:
    if op == OP_MSG and len(body) > 5 and body[4] == 0 and int.from_bytes(body[:4], "little") < 1 << 17:
        doc, _ = decode(body, 5)
        return _status(doc)
    if op == OP_REPLY and len(body) >= 4:
        flags = int.from_bytes(body[:4], "little")
        if flags & QUERY_FAILURE:
            return Reply("failed")
        if len(body) > 20:
            doc, _ = decode(body, 20)
            return _status(doc)
    return Reply("unknown")


def bson(*items: tuple[str, str | int]) -> bytes:
    """A document of strings and int32s (the plug-in's wire samples; tests)."""
    body = b""
    for key, v in items:
        if isinstance(v, str):
            raw = v.encode() + b"\0"
            body += b"\x02" + key.encode() + b"\0" + len(raw).to_bytes(4, "little") + raw
        else:
            body += b"\x10" + key.encode() + b"\0" + v.to_bytes(4, "little", signed=True)
    return (len(body) + 5).to_bytes(4, "little") + body + b"\0"


def op_msg(request_id: int, doc: bytes, response_to: int = 0, flags: int = 0) -> bytes:
    body = flags.to_bytes(4, "little") + b"\0" + doc
    return HEADER.pack(16 + len(body), request_id, response_to, OP_MSG) + body


def op_query(request_id: int, collection: str, doc: bytes) -> bytes:
    body = b"\0\0\0\0" + collection.encode() + b"\0" + b"\0\0\0\0" + b"\xff\xff\xff\xff" + doc
    return HEADER.pack(16 + len(body), request_id, 0, OP_QUERY) + body


_FIND = bson(("find", "users"), ("filter", 0), ("$db", "test"))


class Mongo(p.Protocol):
    id = contract.MONGO
    name = "mongo"
    stem = p.Stem("mongo", "queries")
    kernel_requests = (op_msg(7, _FIND), op_query(8, "test.$cmd", _FIND), op_query(9, "test.users", bson(("a", 1))))
    kernel_non_requests = (
        op_msg(9, bson(("ok", 1)), response_to=7),  # a reply
        HEADER.pack(16 + 20, 10, 7, OP_REPLY) + bytes(20),
        HEADER.pack(21, 11, 0, 2010) + b"\0" * 5,  # an opcode that is no request
        b"\x2a\0\0\0\x01\0\0\0",  # too short for a header
    )

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        cmd = parse_request(request, self.settings.masks.sql_literals)
        if cmd is None or cmd.name.lower() in HANDSHAKES:
            return []
        reply = parse_reply(response, cmd.request_id, cmd.op)
        return [p.Request(self.id, reply.status, seconds, cmd.name, statement=cmd.text, error=reply.error)]

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        return p.db_span(r, "mongodb", "query")
