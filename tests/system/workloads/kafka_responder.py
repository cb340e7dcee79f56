"""A Kafka broker stand-in for the Kafka tests: no Debian package ships Kafka (and a JVM broker
is not installable here), so this answers the wire protocol by its specification
(kafka.apache.org/protocol) as far as a producer needs, one broker (node 0) at 127.0.0.1:PORT:

- ApiVersions v0-v4: it supports ApiVersions 0-4, Metadata 9 and Produce 9 (both flexible
  versions: compact arrays and strings, tagged fields; the client picks them);
- Metadata v9: every topic asked for exists with one partition led by node 0;
- Produce v9: a topic whose name starts with "bad" is answered with error 10
  (MESSAGE_TOO_LARGE, not retriable) for its partitions, any other with offsets.

Requests are read as they arrive (several at once when they do) and answered in order, one
write per response; with DELAY_MS, Produce responses leave that long after their request came,
while later requests are read meanwhile (so a client pipelines them). Each answer is logged to
stdout as a JSON line {"api", "version", "correlation_id", "status", "in_flight"}: in_flight counts
the responses of the connection not written yet, this one included.

    python -m tests.system.workloads.kafka_responder PORT [DELAY_MS]
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import sys
import threading
import time

PRODUCE, METADATA, API_VERSIONS = 0, 3, 18
SUPPORTED = {API_VERSIONS: (0, 4), METADATA: (9, 9), PRODUCE: (9, 9)}
FLEXIBLE_FROM = {API_VERSIONS: 3, METADATA: 9, PRODUCE: 9}
UNSUPPORTED_VERSION, MESSAGE_TOO_LARGE = 35, 10
LOCK = threading.Lock()


class In:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        b = self.data[self.pos:self.pos + n]
        if len(b) != n:
            raise ValueError("short request")
        self.pos += n
        return b

    def i16(self) -> int:
        return int(struct.unpack(">h", self.take(2))[0])

    def i32(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def uvarint(self) -> int:
        v = shift = 0
        while True:
            b = self.take(1)[0]
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v
            shift += 7

    def compact_string(self) -> str | None:
        n = self.uvarint() - 1
        return None if n < 0 else self.take(n).decode()

    def tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self.take(self.uvarint())


def uvarint(v: int) -> bytes:
    out = b""
    while True:
        if v < 0x80:
            return out + bytes([v])
        out += bytes([v & 0x7F | 0x80])
        v >>= 7


def cstr(s: str | None) -> bytes:
    if s is None:
        return b"\0"
    raw = s.encode()
    return uvarint(len(raw) + 1) + raw


def carray(items: list[bytes]) -> bytes:
    return uvarint(len(items) + 1) + b"".join(items)


NO_TAGS = b"\0"


def api_versions(version: int, error: int = 0) -> bytes:
    keys = sorted(SUPPORTED.items())
    if version >= 3:
        body = struct.pack(">h", error) + carray([struct.pack(">hhh", k, lo, hi) + NO_TAGS for k, (lo, hi) in keys])
        return body + struct.pack(">i", 0) + NO_TAGS
    body = struct.pack(">hi", error, len(keys)) + b"".join(struct.pack(">hhh", k, lo, hi) for k, (lo, hi) in keys)
    return body + (struct.pack(">i", 0) if version >= 1 else b"")


def metadata(r: In, port: int) -> bytes:
    n = r.uvarint() - 1
    topics = [] if n < 0 else [(r.compact_string() or "", r.tags())[0] for _ in range(n)]
    brokers = carray([struct.pack(">i", 0) + cstr("127.0.0.1") + struct.pack(">i", port) + cstr(None) + NO_TAGS])
    parts = carray([struct.pack(">hiii", 0, 0, 0, 0) + carray([struct.pack(">i", 0)]) + carray([struct.pack(">i", 0)])
                    + carray([]) + NO_TAGS])
    ts = carray([struct.pack(">h", 0) + cstr(t) + b"\0" + parts + struct.pack(">i", -2147483648) + NO_TAGS
                 for t in topics])
    return (struct.pack(">i", 0) + brokers + cstr("ca-cluster") + struct.pack(">i", 0) + ts
            + struct.pack(">i", -2147483648) + NO_TAGS)


def produce(r: In) -> tuple[bytes, bool]:
    r.compact_string()  # transactional id
    r.i16()  # acks
    r.i32()  # timeout
    failed = False
    topics = []
    for _ in range(r.uvarint() - 1):
        name = r.compact_string() or ""
        bad = name.startswith("bad")
        failed |= bad
        parts = []
        for _ in range(r.uvarint() - 1):
            index = r.i32()
            n = r.uvarint() - 1
            if n > 0:
                r.take(n)
            r.tags()
            parts.append(struct.pack(">ihqqq", index, MESSAGE_TOO_LARGE if bad else 0, -1 if bad else 0, -1, 0)
                         + carray([]) + cstr("too large" if bad else None) + NO_TAGS)
        r.tags()
        topics.append(cstr(name) + carray(parts) + NO_TAGS)
    return carray(topics) + struct.pack(">i", 0) + NO_TAGS, failed


def log(api: int, version: int, corr: int, status: str, in_flight: int) -> None:
    with LOCK:
        sys.stdout.write(json.dumps({"api": api, "version": version, "correlation_id": corr, "status": status,
                                     "in_flight": in_flight}) + "\n")
        sys.stdout.flush()


def respond(req: bytes, port: int, in_flight: int) -> tuple[bytes, int]:
    """A response's bytes and the api key it answers."""
    r = In(req)
    key, version, corr = r.i16(), r.i16(), r.i32()
    n = r.i16()  # client id: int16 length in every header version
    if n > 0:
        r.take(n)
    lo, hi = SUPPORTED.get(key, (0, -1))
    flexible = key in FLEXIBLE_FROM and version >= FLEXIBLE_FROM[key]
    if flexible:
        r.tags()
    status = "ok"
    if key == API_VERSIONS:
        if version > hi:
            body, status = api_versions(0, UNSUPPORTED_VERSION), "failed"
        else:
            body = api_versions(version)
        head = struct.pack(">i", corr)  # ApiVersions' response header has no tagged fields
    elif lo <= version <= hi and key == METADATA:
        body, head = metadata(r, port), struct.pack(">i", corr) + NO_TAGS
    elif lo <= version <= hi and key == PRODUCE:
        body, bad = produce(r)
        head, status = struct.pack(">i", corr) + NO_TAGS, "failed" if bad else "ok"
    else:
        raise ValueError(f"unsupported request: api {key} v{version}")
    log(key, version, corr, status, in_flight)
    msg = head + body
    return struct.pack(">i", len(msg)) + msg, key


def serve(conn: socket.socket, port: int, delay: float) -> None:
    out: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
    unsent = [0]
    lock = threading.Lock()

    def writer() -> None:  # in order, each when it is due
        while (item := out.get()) is not None:
            due, data = item
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                conn.sendall(data)
            except OSError:
                return
            with lock:
                unsent[0] -= 1

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    buf = b""
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                n = int.from_bytes(buf[:4], "big")
                with lock:
                    unsent[0] += 1
                    waiting = unsent[0]
                resp, key = respond(buf[4:4 + n], port, waiting)
                buf = buf[4 + n:]
                out.put((time.monotonic() + (delay if key == PRODUCE else 0.0), resp))
        out.put(None)
        w.join(30)


def main() -> None:
    port = int(sys.argv[1])
    delay = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, port, delay), daemon=True).start()


if __name__ == "__main__":
    main()
