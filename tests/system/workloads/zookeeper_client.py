"""A ZooKeeper client on the wire (jute, as ZooKeeper's zookeeper.jute defines it), for the
ZooKeeper tests. It opens a session (ConnectRequest), then sends one request at a time and
reads its reply before the next, prints one JSON line with what the server answered, then waits
for stdin to close before it exits, so the agent sees the process alive while it handles the
events.

    run PORT PREFIX SPEC ...   each SPEC is OP:N, N requests of OP on paths under PREFIX:
        create          creates PREFIX-<i> (new nodes: err 0)
        get             getData of PREFIX-<i> (created before: err 0)
        exists          exists of PREFIX-<i>
        get-missing     getData of PREFIX-missing-<i> (err -101, NoNode)
        exists-missing  exists of PREFIX-missing-<i> (err -101, NoNode)
        create-bad      create of "/." (a relative path element: err -8, BadArguments)
        ping            a ping (xid -2)
    prints {"session": hex id, "replies": [[op, path, err], ...], "errors": {err: count}}
    split PORT PREFIX SPEC ... the same, framed as ZooKeeper's C client does it: each message's
                               4-byte length in a write of its own, then its body; and every reply
                               read as the Java and C clients read it, its length alone first
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from collections import Counter

OPS = {"create": 1, "exists": 3, "getData": 4, "ping": 11, "closeSession": -11}
PING_XID = -2
OPEN_ACL_UNSAFE = ((31, "world", "anyone"),)  # perms ALL, the world:anyone identity


def ustring(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!i", len(b)) + b


def buffer(b: bytes) -> bytes:
    return struct.pack("!i", len(b)) + b


def frame(body: bytes) -> bytes:
    return struct.pack("!i", len(body)) + body


def connect_request(timeout_ms: int = 30000) -> bytes:
    # protocolVersion, lastZxidSeen, timeOut, sessionId, passwd, readOnly
    return frame(struct.pack("!iqiq", 0, 0, timeout_ms, 0) + buffer(b"\0" * 16) + b"\0")


def create_request(xid: int, path: str, data: bytes = b"v") -> bytes:
    acl = struct.pack("!i", len(OPEN_ACL_UNSAFE)) + b"".join(
        struct.pack("!i", perms) + ustring(scheme) + ustring(ident) for perms, scheme, ident in OPEN_ACL_UNSAFE)
    return frame(struct.pack("!ii", xid, OPS["create"]) + ustring(path) + buffer(data) + acl + struct.pack("!i", 0))


def path_request(xid: int, op: str, path: str, watch: bool = False) -> bytes:
    return frame(struct.pack("!ii", xid, OPS[op]) + ustring(path) + (b"\1" if watch else b"\0"))


def ping_request() -> bytes:
    return frame(struct.pack("!ii", PING_XID, OPS["ping"]))


class Session:
    def __init__(self, port: int, split: bool = False) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.split = split
        self.buf = b""
        self.xid = 0
        self.send(connect_request())
        body = self.frame()
        _proto, _timeout, self.session_id = struct.unpack_from("!iiq", body)

    def send(self, message: bytes) -> None:
        if self.split:  # the length, then the body: two writes
            self.s.sendall(message[:4])
            self.s.sendall(message[4:])
        else:
            self.s.sendall(message)

    def exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            more = self.s.recv(n - len(out))
            if not more:
                raise EOFError("the server closed the connection")
            out += more
        return out

    def frame(self) -> bytes:
        if self.split:  # a read of the length alone, then the body's
            (n,) = struct.unpack("!i", self.exactly(4))
            return self.exactly(n)
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack_from("!i", self.buf)[0]:
            more = self.s.recv(65536)
            if not more:
                raise EOFError("the server closed the connection")
            self.buf += more
        (n,) = struct.unpack_from("!i", self.buf)
        body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return body

    def call(self, request: bytes, xid: int) -> int:
        """Sends one request (one write, or two: split) and returns its reply's err."""
        self.send(request)
        while True:
            rxid, _zxid, err = struct.unpack_from("!iqi", self.frame())
            if rxid == xid:
                return err
            assert rxid == -1, f"reply to xid {rxid}, expected {xid}"  # a watch notification

    def next_xid(self) -> int:
        self.xid += 1
        return self.xid


def run(port: int, prefix: str, specs: list[str], split: bool = False) -> dict:
    s = Session(port, split)
    replies: list[list] = []
    for spec in specs:
        op, _, n = spec.partition(":")
        for i in range(int(n)):
            xid = s.next_xid()
            if op == "create":
                name, path = "create", f"{prefix}-{i}"
                req = create_request(xid, path)
            elif op in ("get", "exists"):
                name = "getData" if op == "get" else "exists"
                path = f"{prefix}-{i}"
                req = path_request(xid, name, path)
            elif op in ("get-missing", "exists-missing"):
                name = "getData" if op == "get-missing" else "exists"
                path = f"{prefix}-missing-{i}"
                req = path_request(xid, name, path)
            elif op == "create-bad":
                name, path = "create", "/."
                req = create_request(xid, path)
            elif op == "ping":
                name, path, xid = "ping", "", PING_XID
                req = ping_request()
            else:
                raise SystemExit(f"unknown op {op}")
            replies.append([name, path, s.call(req, xid)])
    errors = Counter(str(r[2]) for r in replies)
    return {"session": f"{s.session_id:x}", "pid": os.getpid(), "replies": replies, "errors": dict(errors)}


def main() -> None:
    if sys.argv[1] not in ("run", "split"):
        raise SystemExit(__doc__)
    print(json.dumps(run(int(sys.argv[2]), sys.argv[3], sys.argv[4:], split=sys.argv[1] == "split")), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
