"""Memcached, the text and the binary protocol (memcached's doc/protocol.txt and
doc/protocol-binary.txt): the commands of a payload (pipelines included), each paired with its
response in order, and their status as the node agent gives it — a reply is "ok" (a hit, a miss,
STORED, NOT_STORED, EXISTS, NOT_FOUND, DELETED, TOUCHED, a number), an error is "failed"
(ERROR, CLIENT_ERROR, SERVER_ERROR; a binary status other than no error, key not found, key
exists and not stored), and a command whose response was not seen is "unknown".

Values are never kept: a command is its name and its keys (`db.statement` "get k1 k2"), and
nothing of a data block or a VALUE reply is read but its length.

A command that asks for no reply (text "noreply", a binary quiet opcode) is not answered when it
succeeds, so it is "ok" without a response. The kernel sends a call made only of such commands
at once, as a one-way message (bpf/include/l7/memcached.h): it comes here with the call's bytes
where a pair's response would be (its first 512, the rest as the request) and no duration.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from agent.l7 import contract
from agent.l7 import protocol as p

RETRIEVAL = frozenset({"get", "gets", "gat", "gats"})
STORAGE = frozenset({"set", "add", "replace", "append", "prepend", "cas"})
OTHERS = frozenset({"delete", "incr", "decr", "touch", "flush_all"})
COMMANDS = RETRIEVAL | STORAGE | OTHERS
OK_LINES = frozenset({b"END", b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"DELETED", b"TOUCHED", b"OK"})
ERROR_PREFIXES = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
MAX_ERROR = 200  # characters of an error line kept as the span's message
MAX_KEYS = 100  # keys of one command shown

REQUEST_MAGIC, RESPONSE_MAGIC = 0x80, 0x81
# magic, opcode, key length, extras length, data type, vbucket (status), body length, opaque, cas
HEADER = struct.Struct("!BBHBBHIIQ")
# binary opcodes counted (the kernel's L7_MC_OPCODES) -> the text command they are; quiet ones
OPCODES = {0x00: "get", 0x01: "set", 0x02: "add", 0x03: "replace", 0x04: "delete", 0x05: "incr", 0x06: "decr",
           0x08: "flush_all", 0x09: "get", 0x0C: "get", 0x0D: "get", 0x0E: "append", 0x0F: "prepend", 0x11: "set",
           0x12: "add", 0x13: "replace", 0x14: "delete", 0x15: "incr", 0x16: "decr", 0x18: "flush_all",
           0x19: "append", 0x1A: "prepend", 0x1C: "touch", 0x1D: "gat", 0x1E: "gat", 0x23: "gat", 0x24: "gat"}
QUIET = frozenset({0x09, 0x0D, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x18, 0x19, 0x1A, 0x1E, 0x24})
OK_STATUS = frozenset({0x0000, 0x0001, 0x0002, 0x0005})  # no error, key not found, key exists, not stored
STATUS_NAMES = {0x0003: "value too large", 0x0004: "invalid arguments", 0x0006: "non-numeric value",
                0x0007: "vbucket belongs to another server", 0x0008: "authentication error",
                0x0009: "authentication continue", 0x0081: "unknown command", 0x0082: "out of memory",
                0x0083: "not supported", 0x0084: "internal error", 0x0085: "busy", 0x0086: "temporary failure"}


@dataclass(frozen=True)
class Command:
    operation: str  # the text command ("get", "set", ...), a binary opcode's too
    keys: tuple[str, ...]
    noreply: bool = False  # answered only on failure (text noreply, binary quiet)
    counted: bool = True  # a binary no-op, version... is paired but not a query
    opcode: int = -1  # binary: its opcode, and its opaque to pair the response by
    opaque: int = 0

    @property
    def statement(self) -> str:
        return " ".join((self.operation, *self.keys))


@dataclass(frozen=True)
class Reply:
    status: str  # ok | failed
    error: str = ""
    opcode: int = -1  # binary
    opaque: int = 0


@dataclass
class Request(p.Request):
    keys: tuple[str, ...] = field(default_factory=tuple)


def _key(raw: bytes) -> str:
    """A key as shown: UTF-8, with spaces and control characters (binary keys may hold any
    byte) escaped so that a statement's keys stay its space-separated words."""
    s = raw.decode("utf-8", errors="backslashreplace")
    if all(" " < c != "\x7f" for c in s):
        return s
    return "".join(c if " " < c != "\x7f" else f"\\x{ord(c):02x}" for c in s)


# --------------------------------------------------------------------------- text --

def _text_command(line: bytes, complete: bool) -> tuple[Command, int] | None:
    """A command line (without its CRLF) and the size of the data block that follows it; None
    when it is not one. `complete`: the line's end was seen (else the capture cut it, and its
    last word may be cut too)."""
    words = line.split(b" ")
    if not complete:
        words = words[:-1]
    words = [w for w in words if w]  # memcached reads words between any number of spaces
    if not words or line[:1] == b" ":
        return None
    name = words[0].decode("latin-1")
    args = words[1:]
    if name not in COMMANDS:
        return None
    noreply = complete and bool(args) and args[-1] == b"noreply"
    if name in RETRIEVAL:
        keys = args[1:] if name.startswith("gat") else args
        if not keys:
            return None
        return Command(name, tuple(_key(k) for k in keys[:MAX_KEYS])), 0
    if name == "flush_all":
        return Command(name, (), noreply), 0
    if not args:
        return None
    cmd = Command(name, (_key(args[0]),), noreply)
    if name in STORAGE:
        want = 5 if name == "cas" else 4  # key flags exptime bytes [cas unique]
        if not complete:
            return cmd, -1
        if len(args) != want + noreply or not args[3].isdigit():
            return None
        return cmd, int(args[3])
    return cmd, 0


def _text_commands(data: bytes) -> list[Command]:
    out: list[Command] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        parsed = _text_command(data[pos:] if end < 0 else data[pos:end], end >= 0)
        if parsed is None:
            break
        cmd, size = parsed
        out.append(cmd)
        if end < 0 or size < 0:
            break  # cut by the capture
        pos = end + 2 + (size + 2 if cmd.operation in STORAGE else 0)
    return out


def _text_replies(data: bytes, commands: list[Command]) -> list[Reply | None]:
    """The reply of each command (None: not answered or not seen), in order."""
    out: list[Reply | None] = []
    pos: int | None = 0
    for cmd in commands:
        if cmd.noreply or pos is None or pos >= len(data):
            out.append(None)
            continue
        end = data.find(b"\r\n", pos)
        line = data[pos:] if end < 0 else data[pos:end]
        nxt = None if end < 0 else end + 2
        reply: Reply | None = None
        if line.startswith(ERROR_PREFIXES):
            reply = Reply("failed", line[:MAX_ERROR].decode("latin-1"))
        elif end < 0:
            reply = Reply("ok") if line and (line.startswith(b"VALUE ") or any(
                ok.startswith(line) for ok in OK_LINES) or line.isdigit()) else None
        elif line in OK_LINES or line.isdigit():
            reply = Reply("ok")
        elif line.startswith(b"VALUE ") and cmd.operation in RETRIEVAL:
            reply = Reply("ok")
            nxt = _skip_values(data, pos)
        pos = nxt if reply is not None else None
        out.append(reply)
    return out


def _skip_values(data: bytes, pos: int) -> int | None:
    """Past the VALUE blocks and the END of a retrieval's reply; None when cut by the capture."""
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        line = data[pos:end]
        if line == b"END":
            return end + 2
        words = line.split(b" ")
        if words[0] != b"VALUE" or len(words) not in (4, 5) or not words[3].isdigit():
            return None
        pos = end + 2 + int(words[3]) + 2


# ------------------------------------------------------------------------- binary --

def _frames(data: bytes, magic: int) -> list[tuple[tuple[int, ...], bytes]]:
    """(header fields, key) of each frame whose header is whole; the key may be cut."""
    out = []
    pos = 0
    while pos + HEADER.size <= len(data):
        h = HEADER.unpack_from(data, pos)
        mg, _op, keylen, extlen, datatype, _vb, body = h[:7]
        if mg != magic or datatype != 0 or extlen + keylen > body:
            break
        start = pos + HEADER.size + extlen
        out.append((h, data[start:start + keylen]))
        pos += HEADER.size + body
    return out


def _binary_commands(data: bytes) -> list[Command]:
    out = []
    for h, key in _frames(data, REQUEST_MAGIC):
        op, cas, opaque = h[1], h[8], h[7]
        name = OPCODES.get(op)
        if name is None:  # no-op, version, ...: answered, so paired, but not counted
            out.append(Command(f"0x{op:02x}", (), counted=False, opcode=op, opaque=opaque))
            continue
        if name == "set" and cas:
            name = "cas"
        keys = (_key(key),) if key else ()
        out.append(Command(name, keys, op in QUIET, opcode=op, opaque=opaque))
    return out


def _binary_replies(data: bytes, commands: list[Command]) -> list[Reply | None]:
    """Responses come in the order of their requests; a quiet request may have none (a miss, a
    success), so each response goes to the next request with its opcode and opaque."""
    replies = []
    for h, _key_bytes in _frames(data, RESPONSE_MAGIC):
        status = h[5]
        if status in OK_STATUS:
            replies.append(Reply("ok", opcode=h[1], opaque=h[7]))
        else:
            replies.append(Reply("failed", STATUS_NAMES.get(status, f"status 0x{status:04x}"), h[1], h[7]))
    out: list[Reply | None] = [None] * len(commands)
    i = 0
    for r in replies:
        while i < len(commands) and (commands[i].opcode, commands[i].opaque) != (r.opcode, r.opaque):
            if not commands[i].noreply:
                return out  # a request that must have been answered was not: out of step
            i += 1
        if i == len(commands):
            break
        out[i] = r
        i += 1
    return out


# -------------------------------------------------------------------------- both --

def is_request(data: bytes) -> bool:
    """Whether bytes start with a request (text command or binary request), not a reply."""
    if data[:1] == bytes([REQUEST_MAGIC]):
        return bool(_binary_commands(data[:HEADER.size]))
    end = data.find(b" ")
    return data[:end if end >= 0 else 16].split(b"\r\n")[0].decode("latin-1") in COMMANDS


def is_reply(data: bytes) -> bool:
    if data[:1] == bytes([RESPONSE_MAGIC]):
        return True
    line = data.split(b"\r\n", 1)[0]
    return (line.startswith((b"VALUE ", *ERROR_PREFIXES)) or line in OK_LINES or line.isdigit()
            or (b"\r\n" not in data and any(ok.startswith(line) for ok in OK_LINES) and line != b""))


def parse_commands(data: bytes) -> list[Command]:
    """Every command of a payload, text or binary, in order. Never raises."""
    try:
        if data[:1] == bytes([REQUEST_MAGIC]):
            return _binary_commands(data)
        return _text_commands(data)
    except Exception:  # noqa: BLE001 - garbage in: nothing out
        return []


def pair(request: bytes, response: bytes | None) -> list[tuple[Command, Reply | None]]:
    """Each counted command of `request` with its reply in `response` (None: a one-way call,
    nothing answers it here). Never raises."""
    commands = parse_commands(request)
    try:
        if response is None:
            replies: list[Reply | None] = [None] * len(commands)
        elif request[:1] == bytes([REQUEST_MAGIC]):
            replies = _binary_replies(response, commands)
        else:
            replies = _text_replies(response, commands)
    except Exception:  # noqa: BLE001 - a reply we cannot read leaves the status unknown
        replies = [None] * len(commands)
    return [(c, r) for c, r in zip(commands, replies, strict=True) if c.counted]


def status_of(cmd: Command, reply: Reply | None) -> tuple[str, str]:
    if reply is not None:
        return reply.status, reply.error
    return ("ok" if cmd.noreply else "unknown"), ""


class Memcached(p.Protocol):
    id = contract.MEMCACHED
    name = "memcached"
    stem = p.Stem("memcached", "queries")
    kernel_requests = (
        b"get k1\r\n",
        b"gets k1 k2 k3\r\n",
        b"gat 300 k1\r\n",
        b"set k1 0 0 5\r\nhello\r\n",
        b"cas k1 0 0 5 12\r\nhello\r\n",
        b"prepend k1 0 0 1\r\nx\r\n",
        b"replace k1 0 0 1\r\nx\r\n",
        b"delete k1\r\n",
        b"incr n 1\r\n",
        b"touch k1 10\r\n",
        b"flush_all\r\n",
        b"get k1\r\nset k2 0 0 1 noreply\r\nx\r\n",  # waits for the get's reply
        HEADER.pack(0x80, 0x00, 2, 0, 0, 0, 2, 7, 0) + b"k1",  # get
        HEADER.pack(0x80, 0x01, 2, 8, 0, 0, 15, 1, 0) + bytes(8) + b"k1hello",  # set
        HEADER.pack(0x80, 0x0D, 2, 0, 0, 0, 2, 1, 0) + b"k1" + HEADER.pack(0x80, 0x0A, 0, 0, 0, 0, 0, 2, 0),
    )
    kernel_non_requests = (
        b"STORED\r\n",
        b"VALUE k1 0 5\r\nhello\r\nEND\r\n",
        b"END\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"stats\r\n",
        b"version\r\n",
        b"quit\r\n",
        b"mg k1 v\r\n",
        b"get  k1\r\n",
        b"getx k1\r\n",
        b"set\r\n",
        b"flush_allx\r\n",
        HEADER.pack(0x81, 0x00, 0, 4, 0, 0, 9, 7, 0) + bytes(4) + b"hello",  # a response
        HEADER.pack(0x80, 0x0A, 0, 0, 0, 0, 0, 2, 0),  # no-op
        HEADER.pack(0x80, 0x0B, 0, 0, 0, 0, 0, 2, 0),  # version
        HEADER.pack(0x80, 0x00, 2, 0, 1, 0, 2, 7, 0) + b"k1",  # a data type other than raw bytes
        HEADER.pack(0x80, 0x00, 2, 3, 0, 0, 2, 7, 0) + b"k1",  # extras longer than the body
    )

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        if is_request(response):  # a one-way call (bpf/include/l7/memcached.h): its bytes, in two parts
            pairs = pair(response + request, None)
        elif not response or is_reply(response):
            pairs = pair(request, response)
        else:
            return []  # not memcached's reply: the request was not memcached either
        out: list[p.Request] = []
        for cmd, reply in pairs:
            status, error = status_of(cmd, reply)
            out.append(Request(self.id, status, seconds, cmd.operation, statement=cmd.statement, error=error,
                               keys=cmd.keys))
        return out

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        s = p.db_span(r, "memcached", r.method, operation=r.method)
        keys = r.keys if isinstance(r, Request) else ()
        if len(keys) == 1:
            s.attributes["db.memcached.item"] = keys[0]
        elif keys:
            s.attributes["db.memcached.item"] = json.dumps(list(keys))
        return s
