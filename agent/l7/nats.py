"""NATS (the client protocol of docs.nats.io): text lines, operation names case-insensitive.
A client publishes with PUB (HPUB: with headers) and is given messages with MSG (HMSG); each is
a header line ending in the payload's size, the payload, then CRLF. One-way messages: nothing
answers them, so nothing is paired and there is no duration.

Counted as the node agent counts them: a message a client publishes is method "produce", one
delivered to it "consume", status "ok"; the client's view only (no inbound family) and no spans.
The kernel (bpf/include/l7/nats.h) sends every call that starts with a message; each message
whose header line begins in the call's captured bytes is one."""

from __future__ import annotations

from dataclasses import dataclass

from agent.l7 import contract
from agent.l7 import protocol as p

PRODUCE, CONSUME = "produce", "consume"


@dataclass(frozen=True)
class _Op:
    client: bool  # travels client -> server
    args: int  # arguments without the optional reply-to; the last is the total size
    sizes: int  # size arguments at the end (HPUB/HMSG: header bytes, total bytes)


MESSAGES = {b"PUB": _Op(True, 2, 1), b"HPUB": _Op(True, 3, 2), b"MSG": _Op(False, 3, 1), b"HMSG": _Op(False, 4, 2)}
OTHERS = frozenset({b"PING", b"PONG", b"+OK", b"-ERR", b"INFO", b"CONNECT", b"SUB", b"UNSUB"})
MAX_DIGITS = 10  # a size longer than this is not NATS (its max_payload is at most 64 MB)


def _size(token: bytes) -> int | None:
    return int(token) if token.isdigit() and len(token) <= MAX_DIGITS else None


def messages(data: bytes, truncated: bool = False) -> list[str]:
    """The message operations (PUB, HPUB, MSG, HMSG, upper case) in one call's bytes, in order,
    up to the first thing that is not NATS. `truncated`: the call went on past `data`, so a
    message whose header line is cut off by the end of `data` still counts."""
    out: list[str] = []
    pos = 0
    try:
        while pos < len(data):
            end = data.find(b"\r\n", pos)
            line = data[pos:] if end < 0 else data[pos:end]
            parts = line.split()
            if not parts or not line.startswith(parts[0]):
                break
            word = parts[0].upper()
            if end < 0:  # the line runs past what was captured
                if truncated and word in MESSAGES and len(line) > len(parts[0]):
                    out.append(word.decode())
                break
            pos = end + 2
            op = MESSAGES.get(word)
            if op is None:
                if word not in OTHERS:
                    break
                continue
            args = parts[1:]
            if len(args) not in (op.args, op.args + 1):
                break
            total, header = _size(args[-1]), _size(args[-2]) if op.sizes == 2 else 0
            if total is None or header is None or header > total:
                break
            tail = pos + total
            if tail + 2 <= len(data) and data[tail:tail + 2] != b"\r\n":
                break  # the payload is not where the line says: not NATS
            out.append(word.decode())
            pos = tail + 2
    except Exception:  # noqa: BLE001 - garbage in: what was read so far
        pass
    return out


class Nats(p.Protocol):
    id = contract.NATS
    name = "nats"
    stem = p.Stem("nats", "messages", histogram=False, method=True, inbound=False)
    streaming = True  # one-way messages: every call that carries one comes to feed
    kernel_messages = (
        b"PUB orders.new 5\r\nhello\r\n",
        b"MSG orders.new 1 5\r\nhello\r\n",
        b"HPUB orders.new 18 23\r\nNATS/1.0\r\nk: v\r\n\r\nhello\r\n",
        b"HMSG orders.new 1 18 23\r\nNATS/1.0\r\nk: v\r\n\r\nhello\r\n",
        b"MSG orders.new 1 5\r\nhello\r\nMSG orders.a 1 reply.1 2\r\nhi\r\n",
        b"pub\torders.new 2\r\nhi\r\n",
        b"PONG\r\nMSG orders.new 1 2\r\nhi\r\n",
        b"+OK\r\nMSG orders.new 1 2\r\nhi\r\n",
    )
    kernel_non_requests = (
        b"PING\r\n",
        b"PONG\r\n",
        b"SUB orders.* 1\r\nPING\r\n",
        b'CONNECT {"verbose":false}\r\nPING\r\n',
        b'INFO {"server_id":"x","version":"2.9.10"}\r\n',
        b"PUB orders.new 5\r\nhel",  # the call does not end a line
        b"PUBLISH x 1\r\n\r\n",
        b"MSG  1 5\r\nhello\r\n",
        b"PONG\r\nSUB orders.* 1\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    )

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        return []  # one-way messages come to feed

    def feed(self, conn: p.ConnKey, client: bool, ts_ns: int, data: bytes, size: int) -> list[p.Request]:
        method = PRODUCE if client else CONSUME
        return [p.Request(self.id, "ok", 0.0, method=method, start_ns=ts_ns)
                for op in messages(data, truncated=size > len(data)) if MESSAGES[op.encode()].client == client]
