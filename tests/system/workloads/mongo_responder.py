"""A MongoDB stand-in for the MongoDB tests: no Debian package ships a MongoDB server (and its
own builds are not installable here), so this answers the wire protocol by its specification
(www.mongodb.com/docs/manual/reference/mongodb-wire-protocol) as far as a driver needs:

- the handshake: `isMaster`/`ismaster` in an OP_QUERY on `<db>.$cmd` (answered with an OP_REPLY)
  and `hello`/`isMaster` in an OP_MSG, as a standalone server of wire version 21 (MongoDB 7.0)
  without sessions (no logicalSessionTimeoutMinutes: the driver sends no lsid and no
  endSessions) and without topologyVersion (the driver's monitor polls, it does not stream);
- `find`: a filter with the field `fail` is answered with ok 0 (code 2, BadValue), any other
  with an empty first batch;
- `insert`: its documents (an OP_MSG document sequence); a document with `_id` "dup" is answered
  with ok 1 and a writeError (code 11000), the others with n;
- any other command: ok 1.

It reads what arrives (several messages at once when they do) and answers each message with one
write. Each answer is logged to stdout as a JSON line {"command", "status", "code"} ("handshake"
for hello/isMaster), so the test knows exactly what the server answered.

    python -m tests.system.workloads.mongo_responder PORT
"""

from __future__ import annotations

import datetime
import json
import socket
import struct
import sys
import threading
from typing import Any

import bson

OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013
HEADER = struct.Struct("<iiii")
LOCK = threading.Lock()
NEXT_ID = [1000]


def hello_doc() -> dict[str, Any]:
    return {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000, "maxWriteBatchSize": 100_000, "localTime": datetime.datetime.now(datetime.UTC),
            "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False, "connectionId": 1, "ok": 1.0}


def log(command: str, status: str, code: int = 0) -> None:
    with LOCK:
        sys.stdout.write(json.dumps({"command": command, "status": status, "code": code}) + "\n")
        sys.stdout.flush()


def answer(cmd: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    name = next(iter(cmd), "")
    if name.lower() in ("hello", "ismaster"):
        log("handshake", "ok")
        return hello_doc()
    if name == "find":
        if "fail" in cmd.get("filter", {}):
            log("find", "failed", 2)
            return {"ok": 0.0, "errmsg": "unknown operator: $fail", "code": 2, "codeName": "BadValue"}
        log("find", "ok")
        return {"cursor": {"firstBatch": [], "id": bson.int64.Int64(0), "ns": f"{cmd.get('$db')}.{cmd[name]}"},
                "ok": 1.0}
    if name == "insert":
        dups = [i for i, d in enumerate(docs) if d.get("_id") == "dup"]
        if dups:
            log("insert", "failed", 11000)
            return {"n": len(docs) - len(dups), "ok": 1.0, "writeErrors": [
                {"index": i, "code": 11000, "errmsg": "E11000 duplicate key error"} for i in dups]}
        log("insert", "ok")
        return {"n": len(docs), "ok": 1.0}
    log(name, "ok")
    return {"ok": 1.0}


def reply(request_id: int, op: int, doc: dict[str, Any]) -> bytes:
    with LOCK:
        NEXT_ID[0] += 1
        rid = NEXT_ID[0]
    raw = bson.encode(doc)
    if op == OP_QUERY:  # OP_REPLY: responseFlags, cursorID, startingFrom, numberReturned, documents
        body = struct.pack("<iqii", 0, 0, 0, 1) + raw
        return HEADER.pack(16 + len(body), rid, request_id, OP_REPLY) + body
    body = struct.pack("<I", 0) + b"\0" + raw
    return HEADER.pack(16 + len(body), rid, request_id, OP_MSG) + body


def handle(msg: bytes) -> bytes | None:
    _length, request_id, _to, op = HEADER.unpack_from(msg)
    if op == OP_QUERY:
        pos = msg.index(b"\0", 20) + 1 + 8  # the collection name, skip, limit
        return reply(request_id, op, answer(bson.decode(msg[pos:pos + int.from_bytes(msg[pos:pos + 4], "little")]),
                                            []))
    if op != OP_MSG:
        return None
    flags = int.from_bytes(msg[16:20], "little")
    end = len(msg) - (4 if flags & 1 else 0)
    pos, cmd, docs = 20, {}, []
    while pos < end:
        kind = msg[pos]
        size = int.from_bytes(msg[pos + 1:pos + 5], "little")
        if kind == 0:
            cmd = bson.decode(msg[pos + 1:pos + 1 + size])
            pos += 1 + size
        else:  # a document sequence: size, identifier, documents
            ident_end = msg.index(b"\0", pos + 5) + 1
            docs += bson.decode_all(msg[ident_end:pos + 1 + size])
            pos += 1 + size
    out = answer(cmd, docs)
    return None if flags & 2 else reply(request_id, op, out)  # moreToCome: no answer


def serve(conn: socket.socket) -> None:
    buf = b""
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while len(buf) >= 16 and len(buf) >= int.from_bytes(buf[:4], "little"):
                n = int.from_bytes(buf[:4], "little")
                out = handle(buf[:n])
                buf = buf[n:]
                if out:
                    conn.sendall(out)


def main() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
