"""Prometheus remote_write 1.0: every scrape interval, the agent's registry becomes one
snappy-compressed protobuf WriteRequest that is written to a disk spool first and then sent,
oldest first. 5xx, 429, 401/403 and network errors are retried with backoff (5 s -> 1 min);
other 4xx answers drop the request (logged once per status, counted). The spool is bounded by
--max-spool-size (the oldest requests are dropped and counted) and survives restarts.

The protobuf encoder is hand-written for the three messages remote write uses (WriteRequest,
TimeSeries, Label/Sample of prometheus/prompb); tests prove it byte-identical to the protobuf
library's. Reads a prometheus-client registry; knows nothing of eBPF. A component
(agent/component.py): its thread scrapes and sends; `close()` scrapes a last time, spools it,
and sends what it can within a deadline (the rest goes from the spool at the next start).

Only http:// and https:// URLs. A user:password@ in the URL becomes the basic-auth header and
is kept nowhere else: `self.url`, every log line and every error show the URL without it, and
any text from urllib or the server passes a redactor that removes the password before it is
logged.
"""

from __future__ import annotations

import base64
import http.client
import logging
import math
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import cramjam
from prometheus_client import CollectorRegistry

from agent import __version__, units
from agent.component import Component
from agent.metrics import Families
from agent.sinks.spool import Spool

log = logging.getLogger(__name__)

JOB = "coroot-node-agent"
CLOSE_DEADLINE = 1.0  # seconds close() may spend sending; the agent's whole stop has 2
Labels = Sequence[tuple[str, str]]
Series = tuple[Labels, Sequence[tuple[float, int]]]  # (sorted labels, [(value, timestamp ms)])


# ------------------------------------------------------------------ protobuf --


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 negatives: two's complement, 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _label(name: str, value: str) -> bytes:
    out = b""
    if name:
        out += _field_bytes(1, name.encode())
    if value:
        out += _field_bytes(2, value.encode())
    return out


def _sample(value: float, ts_ms: int) -> bytes:
    out = b""
    if value != 0.0 or math.copysign(1.0, value) < 0 or math.isnan(value):
        out += b"\x09" + struct.pack("<d", value)  # field 1, fixed64
    if ts_ms:
        out += b"\x10" + _varint(ts_ms)  # field 2, varint
    return out


class LabelCache:
    """Encoded label sets, reused from one scrape to the next (series repeat); bounded."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._d: dict[tuple[tuple[str, str], ...], bytes] = {}

    def get(self, labels: Labels) -> bytes:
        key = tuple(labels)
        enc = self._d.get(key)
        if enc is None:
            if len(self._d) >= self.max_entries:
                self._d.clear()
            enc = self._d[key] = b"".join(_field_bytes(1, _label(n, v)) for n, v in labels)
        return enc


def encode_write_request(series: Iterable[Series], cache: LabelCache | None = None) -> bytes:
    """prometheus.WriteRequest{timeseries: [TimeSeries{labels, samples}]} in proto3 wire format."""
    out = bytearray()
    for labels, samples in series:
        ts = cache.get(labels) if cache is not None else b"".join(_field_bytes(1, _label(n, v)) for n, v in labels)
        ts += b"".join(_field_bytes(2, _sample(v, t)) for v, t in samples)
        out += _field_bytes(1, ts)
    return bytes(out)


# ------------------------------------------------------------------ gathering --


def gather(registry: CollectorRegistry, extra: dict[str, str], ts_ms: int) -> list[Series]:
    """Every sample of the registry as one series each, labels sorted by name (as remote write
    requires), `extra` (instance, job) added unless the sample has them."""
    out: list[Series] = []
    for fam in registry.collect():
        for s in fam.samples:
            labels = dict(extra)
            labels.update(s.labels)
            labels["__name__"] = s.name
            ts = int(float(s.timestamp) * 1000) if s.timestamp is not None else ts_ms
            out.append((sorted(labels.items()), ((float(s.value), ts),)))
    return out


# -------------------------------------------------------------------- sending --


@dataclass
class WriterStats:
    sent: int = 0
    failed: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"spool_full": 0, "rejected": 0})
    requests: int = 0
    last_success: float = 0.0
    last_error: str = ""


class RemoteWriter(Component):
    name = "remote_write"

    def __init__(
        self,
        url: str,
        registry: CollectorRegistry,
        spool: Spool,
        interval: float = 15.0,
        user: str = "",
        password: str = "",
        headers: Iterable[tuple[str, str]] = (),
        api_key: str = "",
        skip_verify: bool = False,
        ca_file: str = "",
        instance: str | None = None,
        backoff: tuple[float, float] = (5.0, 60.0),
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parsed = units.parse_http_url(url)  # ValueError: not http(s), or a malformed URL
        if parsed.has_credentials:
            if user or password:
                raise ValueError(
                    f"remote_write URL {units.redact_url(url)!r} carries a user and password, and "
                    "a user/password is configured too; use one of the two")
            user, password = parsed.user, parsed.password
        self.url = parsed.url
        self.registry = registry
        self.spool = spool
        self.interval = interval
        self.extra = {"instance": instance or socket.gethostname(), "job": JOB}
        self.headers = {
            "Content-Encoding": "snappy",
            "Content-Type": "application/x-protobuf",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
            "User-Agent": f"coroot-agent/{__version__}",
        }
        self.headers.update(dict(headers))
        if api_key:
            self.headers["X-Api-Key"] = api_key
        self._secrets: tuple[str, ...] = ()
        if user or password:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
            self._secrets = (password, urllib.parse.quote(password, safe=""), token)
        if api_key:
            self._secrets += (api_key,)
        self._ssl: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=ca_file or None)
            if skip_verify:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self.backoff_min, self.backoff_max = backoff
        self.timeout = timeout
        self._clock = clock
        self._delay = 0.0
        self._next_try = 0.0
        self._logged_statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self.stats = WriterStats()
        self._labels = LabelCache()

    # ------------------------------------------------------------- driving --

    def scrape(self, ts_ms: int | None = None) -> int:
        """Gather, encode, compress and spool one request; returns its sample count."""
        ts_ms = ts_ms if ts_ms is not None else int(time.time() * 1000)
        series = gather(self.registry, self.extra, ts_ms)
        return self.enqueue(series)

    def enqueue(self, series: Sequence[Series]) -> int:
        n = sum(len(s[1]) for s in series)
        payload = bytes(cramjam.snappy.compress_raw(encode_write_request(series, self._labels)))
        for dropped in self.spool.push("rw", n, payload):
            self.stats.dropped["spool_full"] += dropped.count
            log.warning("remote_write spool full (%d bytes): dropped the oldest request (%d samples)",
                        self.spool.max_bytes, dropped.count)
        return n

    def send_pending(self, deadline: float | None = None) -> None:
        """Send spooled requests, oldest first, until one fails, all are sent, or the clock
        passes `deadline` (each request's timeout shortened to what is left of it)."""
        with self._send_lock:
            self._send(deadline)

    def _send(self, deadline: float | None) -> None:
        """send_pending's loop; the send lock is held."""
        while self._clock() >= self._next_try:
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - self._clock())
                if timeout <= 0.05:
                    return
            item = self.spool.oldest()
            if item is None:
                return
            entry, payload = item
            verdict = self._post(payload, timeout)
            if verdict == "ok":
                self.stats.sent += entry.count
                self.stats.last_success = time.time()
                self.spool.remove(entry)
                self._delay = 0.0
            elif verdict == "drop":
                self.stats.dropped["rejected"] += entry.count
                self.spool.remove(entry)
            else:
                self.stats.failed += entry.count
                self._delay = min(self.backoff_max, max(self.backoff_min, self._delay * 2))
                self._next_try = self._clock() + self._delay
                return

    def _post(self, payload: bytes, timeout: float) -> str:
        """'ok', 'drop' (not worth retrying) or 'retry'. An endpoint that hangs up at any point,
        even in the middle of its answer, is an error to retry, never an exception."""
        self.stats.requests += 1
        req = urllib.request.Request(self.url, data=payload, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as r:
                r.read()
            if self.stats.last_error:
                log.info("remote_write to %s works again", self.url)
                self.stats.last_error = ""
            return "ok"
        except urllib.error.HTTPError as e:
            try:
                body = self._redact(e.read()[:300].decode(errors="replace").strip())
            except (OSError, ValueError, http.client.HTTPException):  # it hung up mid-answer
                body = ""
            reason = self._redact(e.reason)
            if e.code in (401, 403):
                self._error(f"remote_write to {self.url}: {e.code} {reason}: check global_prometheus.user "
                            f"and password (--prometheus-user, --prometheus-password); requests stay spooled")
                return "retry"
            if e.code == 429 or e.code >= 500:
                self._error(f"remote_write to {self.url}: {e.code} {reason} {body}; retrying")
                return "retry"
            if e.code not in self._logged_statuses:
                self._logged_statuses.add(e.code)
                log.error("remote_write to %s: %d %s: %s; dropping such requests (logged once)",
                          self.url, e.code, reason, body)
            return "drop"
        except (OSError, ValueError, http.client.HTTPException) as e:  # refused, TLS, timeouts, garbage
            reason = self._redact(getattr(e, "reason", e))
            self._error(f"remote_write to {self.url}: {reason}; retrying")
            return "retry"

    def _redact(self, text: object) -> str:
        """Text from urllib or the endpoint, without the password, the auth token or a URL's userinfo."""
        return units.redact_text(str(text), self._secrets)

    def _error(self, msg: str) -> None:
        if msg != self.stats.last_error:
            log.warning("%s", msg)
        self.stats.last_error = msg

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="remote-write", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_scrape = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            if now >= next_scrape:
                try:
                    self.scrape()
                except Exception:  # noqa: BLE001 - one bad collector must not stop shipping
                    log.exception("remote_write: gathering metrics")
                next_scrape = now + self.interval
            try:
                self.send_pending()
            except Exception:  # noqa: BLE001
                log.exception("remote_write: sending")
            self._stop.wait(min(0.5, max(0.0, next_scrape - self._clock())))

    def close(self, deadline: float = CLOSE_DEADLINE) -> None:
        """A last scrape, spooled, and sending for at most `deadline` seconds in all (what is
        not sent stays spooled for the next start). Safe to call twice."""
        if self._stop.is_set():
            return
        end = self._clock() + deadline
        self._stop.set()
        if self._thread is not None:
            # A request in flight ends by its own timeout; the spool keeps whatever it was sending.
            self._thread.join(timeout=deadline / 2)
            self._thread = None
        try:
            self.scrape()
        except Exception:  # noqa: BLE001 - one bad collector must not lose the spool's requests
            log.exception("remote_write: the last scrape")
        # The thread may still be in a request that hangs: wait for its lock only until the end.
        if self._send_lock.acquire(timeout=max(0.0, end - self._clock())):
            try:
                self._next_try = 0.0
                self._send(end)
            finally:
                self._send_lock.release()

    def self_metrics(self, f: Families) -> None:
        s = self.stats
        f.counter("coroot_agent_remote_write_samples_sent_total", "samples accepted by the remote_write endpoint", s.sent)
        f.counter("coroot_agent_remote_write_samples_failed_total", "samples in requests that failed and will be retried", s.failed)
        for reason, n in s.dropped.items():
            f.counter("coroot_agent_remote_write_samples_dropped_total", "samples dropped: spool full, or rejected by the endpoint", n, reason=reason)
        f.gauge("coroot_agent_remote_write_spool_bytes", "bytes of requests waiting in the spool", self.spool.bytes)
        if s.last_success:
            f.gauge("coroot_agent_remote_write_last_success_timestamp_seconds", "time of the last accepted request", s.last_success)
