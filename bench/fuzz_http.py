"""Fuzz the agent's HTTP server with bytes: random and mutated request heads, header counts,
Content-Length values and bodies go to an in-process ApiServer over real loopback sockets. Each
case sends its bytes, half-closes (a few do not: the server's deadlines must end those), and
reads until the server closes.

A finding is: a reply that is not a sequence of well-formed HTTP/1.1 responses, a 500, no close
within the timeout (a hang), a reset with no answer, a request left unanswered, a WARNING or
ERROR the server logged, its thread dead or /healthz slow or failing, connections left open
after the run, or memory growth past 50 MB. Prints cases per second, the statuses seen and
every finding.

    python bench/fuzz_http.py [--cases 100000] [--seconds 300] [--seed 1] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prometheus_client import CollectorRegistry  # noqa: E402

from agent.api.server import ApiServer, Response  # noqa: E402

KEY = "fuzz-key"
SEEDS = [
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"POST /api/echo?format=json HTTP/1.1\r\nHost: x\r\nX-Api-Key: fuzz-key\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /api/echo HTTP/1.1\r\nX-Api-Key: fuzz-key\r\nContent-Length: 3\r\n\r\nabcPOST /api/echo HTTP/1.1\r\n"
    b"X-Api-Key: fuzz-key\r\nContent-Length: 0\r\n\r\n",
    b"GET /api/echo HTTP/1.1\r\nX-Api-Key: fuzz-key\r\n\r\n",
    b"POST /api/echo HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\naaaa",
    b"POST /api/echo HTTP/1.1\r\nX-Api-Key: fuzz-key\r\nContent-Length: -1\r\n\r\n",
    b"POST /api/echo HTTP/1.1\r\nX-Api-Key: fuzz-key\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /api/echo HTTP/1.1\r\nX-Api-Key: fuzz-key\r\n\r\n",
    b"POST /api/nope HTTP/1.1\r\nX-Api-Key: fuzz-key\r\nContent-Length: 2\r\n\r\nhi",
    b"DELETE /metrics HTTP/1.1\r\n\r\n",
    b"GET /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
]
TOKENS = [b"\r\n", b"\r", b"\n", b"\r\n\r\n", b":", b" ", b"\t", b"\x00", b"\xff", b"\x7f", b"/", b"?", b"%",
          b"Content-Length: ", b"Content-Length: -1\r\n", b"Content-Length: 99999999999999999999\r\n",
          b"Content-Length: 0\r\n", b"Content-Length: 1\r\n", b"Transfer-Encoding: chunked\r\n",
          b"X-Api-Key: fuzz-key\r\n", b"X-Api-Key: wrong\r\n", b"Connection: close\r\n",
          b"Connection: keep-alive\r\n", b"Host: a\r\nHost: b\r\n", b" folded\r\n", b"HTTP/1.0", b"HTTP/2.0",
          b"HTTP/1.1", b"GET", b"POST", b"HEAD", b"/api/echo", b"/metrics", b"/healthz", b"0", b"-", b"+",
          b"1e9", b"\xc2\xb2", b"\x01"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 5)):
        op = rng.random()
        pos = rng.randint(0, len(b))
        if op < 0.35:
            b[pos:pos] = rng.choice(TOKENS)
        elif op < 0.5 and b:
            del b[pos:pos + rng.randint(1, 8)]
        elif op < 0.6 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.7:
            other = rng.choice(SEEDS)
            b[pos:] = other[rng.randint(0, len(other)):]
        elif op < 0.78:  # many headers
            line = rng.choice([b"A: b\r\n", b"X-Api-Key: fuzz-key\r\n", b"Content-Length: 1\r\n", b"\r\n"])
            b[pos:pos] = line * rng.choice([1, 2, 50, 99, 100, 101, 150])
        elif op < 0.84:  # a long value, around the head's cap
            b[pos:pos] = b"X-Long: " + b"v" * rng.choice([100, 8000, 16300, 16384, 17000, 40000]) + b"\r\n"
        elif op < 0.92:  # a body, maybe not the declared size
            b += bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 100, 3000])))
        else:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
    return bytes(b)


def case(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.08:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
    if r < 0.15:
        return rng.choice(SEEDS)
    return mutate(rng, rng.choice(SEEDS))


STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


def check_reply(data: bytes) -> tuple[list[int], str]:
    """The statuses in a reply stream, and a problem ('' when it is well-formed)."""
    statuses: list[int] = []
    pos = 0
    while pos < len(data):
        m = STATUS_LINE.match(data, pos)
        if not m:
            return statuses, f"not an HTTP response at byte {pos}: {data[pos:pos + 40]!r}"
        end = data.find(b"\r\n\r\n", m.start())
        if end < 0:
            return statuses, "a response head without its end"
        head = data[m.end():end].decode("latin-1")
        lengths = [line.split(":", 1)[1].strip() for line in head.split("\r\n")
                   if line.lower().startswith("content-length:")]
        if len(lengths) != 1 or not lengths[0].isdigit():
            return statuses, f"a response without one Content-Length: {head[:200]!r}"
        statuses.append(int(m.group(1)))
        pos = end + 4 + int(lengths[0])  # cases with HEAD in them are checked by their first line only
        if pos > len(data):
            return statuses, "a body shorter than its Content-Length"
    return statuses, ""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class ErrorLog(logging.Handler):
    """Every WARNING or worse the server logs is a finding: clients cannot cause those."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({record.exc_info[1]!r})"
        self.records.append(f"{record.levelname} {record.name}: {text}")


class Fuzz:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log = ErrorLog()
        logging.getLogger().addHandler(self.log)
        logging.getLogger().setLevel(logging.WARNING)
        reg = CollectorRegistry()
        self.server = ApiServer("127.0.0.1", 0, reg, KEY, header_timeout=1.0, body_timeout=1.0, idle_timeout=1.0,
                                max_body=64 * 1024, max_connections=256)
        reg.register(self.server.collector())
        self.server.route("/api/echo", lambda q, b: Response(200, json.dumps({"q": q, "n": len(b)}).encode()))
        self.server.start()
        self.lock = threading.Lock()
        self.done = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.findings: list[str] = []
        self.finding_kinds: collections.Counter[str] = collections.Counter()
        self.deadline = time.monotonic() + args.seconds
        self.reply_timeout = 1.0 + 1.0 + 2.0

    def finding(self, kind: str, data: bytes, detail: str) -> None:
        with self.lock:
            self.finding_kinds[kind] += 1
            if len(self.findings) < 30:
                self.findings.append(f"{kind}: {detail}; case {data[:120]!r}")

    def one(self, data: bytes, use_head: bool, half_close: bool = True) -> None:
        """Without the half-close the server's own deadlines (header, body, idle) must end it."""
        port = self.server.port
        s = socket.create_connection(("127.0.0.1", port), timeout=self.reply_timeout)
        got = b""
        reset = False
        try:
            try:
                s.sendall(data)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                reset = True  # the server closed first (a refusal): its answer is still readable
            while True:
                try:
                    more = s.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    reset = True
                    break
                except TimeoutError:
                    self.finding("hang", data, f"no close within {self.reply_timeout} s")
                    return
                if not more:
                    break
                got += more
        finally:
            s.close()
        if reset and not got:
            self.finding("reset without an answer", data, "")
            return
        statuses, problem = check_reply(got) if not use_head else ([int(got[9:12])] if got[:9] == b"HTTP/1.1 " else [], "")
        if use_head and not statuses and got:
            problem = f"not HTTP: {got[:40]!r}"
        if problem:
            self.finding("malformed reply", data, problem)
        with self.lock:
            for st in statuses:
                self.statuses[f"{st}"] += 1
                if st == 500:
                    self.finding_kinds["500"] += 1
                    if len(self.findings) < 30:
                        self.findings.append(f"500: case {data[:120]!r}")
            if not statuses:
                self.statuses["closed without an answer"] += 1
        if not statuses and data.strip(b"\r\n") and half_close:
            self.finding("no answer", data, "the server closed without answering a request")

    def worker(self, w: int) -> None:
        rng = random.Random(self.args.seed * 1000003 + w)
        while True:
            with self.lock:
                if self.done >= self.args.cases or time.monotonic() > self.deadline:
                    return
                self.done += 1
            data = case(rng)
            try:
                self.one(data, b"HEAD " in data, half_close=rng.random() > 0.002)
            except OSError as e:
                self.finding("client error", data, repr(e))

    def healthy(self) -> str:
        t = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=2) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
                reply = s.recv(4096)
        except OSError as e:
            return f"/healthz failed: {e}"
        took = time.monotonic() - t
        if not reply.startswith(b"HTTP/1.1 200 "):
            return f"/healthz answered {reply[:40]!r}"
        if took > 0.5:
            return f"/healthz took {took:.2f} s"
        if self.server._thread is None or not self.server._thread.is_alive():  # noqa: SLF001
            return "the server thread died"
        return ""

    def run(self) -> int:
        rss0 = rss_mb()
        t0 = time.monotonic()
        threads = [threading.Thread(target=self.worker, args=(w,), daemon=True) for w in range(self.args.concurrency)]
        for th in threads:
            th.start()
        last = 0
        rss_warm = None
        while any(th.is_alive() for th in threads):
            time.sleep(1)
            problem = self.healthy()
            if problem:
                self.finding("server", b"", problem)
            if rss_warm is None and self.done >= 5000:
                rss_warm = rss_mb()
            if time.monotonic() - last > 10:
                last = time.monotonic()
                el = last - t0
                print(f"  {self.done} cases, {self.done / el:.0f}/s, findings {sum(self.finding_kinds.values())}, "
                      f"rss {rss_mb():.0f} MB, open {self.server.open_connections()}", flush=True)
        for th in threads:
            th.join()
        el = time.monotonic() - t0
        time.sleep(1.5)  # idle/lingering connections close
        if self.server.open_connections():
            self.finding("leak", b"", f"{self.server.open_connections()} connections open after the run")
        rss1 = rss_mb()
        if rss1 - (rss_warm or rss0) > 50:
            self.finding("memory", b"", f"RSS grew {rss0:.0f} -> {rss_warm or rss0:.0f} -> {rss1:.0f} MB")
        problem = self.healthy()
        if problem:
            self.finding("server", b"", problem)
        for rec in self.log.records:
            self.finding("logged", b"", rec)
        stats = self.server.stats
        self.server.stop()
        print(f"HTTP server fuzz: {self.done} cases in {el:.0f} s ({self.done / el:.0f} cases/s), "
              f"concurrency {self.args.concurrency}, seed {self.args.seed}")
        print(f"  statuses: {dict(sorted(self.statuses.items()))}")
        print(f"  server: accepted {stats.accepted}, evicted {stats.evicted}, refused {stats.refused}, "
              f"timeouts {stats.timeouts}")
        print(f"  RSS {rss0:.0f} MB at start, {rss_warm or rss0:.0f} MB after warm-up, {rss1:.0f} MB at the end")
        print(f"  findings: {sum(self.finding_kinds.values())} {dict(self.finding_kinds)}")
        for f in self.findings:
            print("FINDING", f)
        return 1 if self.finding_kinds else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=8)
    return Fuzz(ap.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
