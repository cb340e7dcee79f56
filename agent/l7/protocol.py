"""What an L7 protocol plug-in is. One module per protocol under agent/l7/ holds its parser and
a `Protocol` subclass that turns a request/response pair into requests (with their status),
spans (name, attributes, status) and the metric stem they are counted under; its kernel-side
detector is one header under bpf/include/l7/. agent/l7/protocols.py lists the plug-ins.

The tracer (agent/l7/tracer.py) keeps what is common: attribution to containers and
connections, deferral, pairing with the kernel's counts, aggregation and the span rows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

from agent.metrics import Families


@dataclass(frozen=True)
class Masks:
    """What is masked before anything is stored (config: mask_*)."""

    url_query: bool = True
    url_path: bool = True
    sql_literals: bool = True
    redis_values: bool = True


@dataclass(frozen=True)
class Settings:
    masks: Masks = field(default_factory=Masks)
    exclude_paths: frozenset[str] = frozenset()  # HTTP paths that never become spans
    max_fqdns: int = 50  # DNS: domains per container before the rest count as "other"


@dataclass
class Request:
    """One request of a pair (a pipelined payload yields several)."""

    protocol: int
    status: str  # the metric's status label
    duration: float
    method: str = ""  # HTTP method, Redis command, DNS query type
    path: str = ""  # HTTP path, DNS domain
    code: int = 0  # HTTP status code
    statement: str = ""
    error: str = ""
    grpc: int = -1  # gRPC status code (grpc-status), -1 when not gRPC
    start_ns: int = 0  # when the request was seen (stream protocols); 0: the event's start


@dataclass(frozen=True)
class Peer:
    """The connection a span was made on, as the span shows it."""

    destination: str  # host:port of http.url: the actual destination if known, else as dialled
    name: str  # net.peer.name: the actual address if known, else the dialled one (a DNS domain only when folded)
    port: int
    actual_ip: str  # after NAT (conntrack)


@dataclass
class Span:
    name: str
    attributes: dict[str, str]
    status: str = "STATUS_CODE_UNSET"  # or STATUS_CODE_ERROR; never OK (the node agent sets only errors)
    message: str = ""


@dataclass(frozen=True)
class Stem:
    """Metric names: container_<protocol>_<unit>_total, container_<protocol>_inbound_<unit>_total
    and their _duration_seconds_total histograms."""

    protocol: str
    unit: str
    histogram: bool = True  # False: the counters only (one-way messages have no duration)
    method: bool = False  # the outbound counter has a `method` label: each request's method
    inbound: bool = True  # False: no inbound families; the server side's events are dropped


ConnKey = tuple[int, int, int]  # (pid, fd, connection start): one connection

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A map of at most `limit` entries: putting one more drops the least recently put or used.
    What plug-ins keep per connection (its parser state, by ConnKey), per request in flight or
    per prepared statement is kept in one, so nothing a peer sends grows without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        """The value under `key` (now the most recently used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value under `key`, its place unchanged, or None."""
        return self._items.get(key)

    def setdefault(self, key: K, factory: Callable[[], V]) -> V:
        """The value under `key` (now the most recently used), made by `factory` if there is none."""
        value = self.get(key)
        if value is None:
            value = factory()
            self.put(key, value)
        return value

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def items(self) -> Iterator[tuple[K, V]]:
        """The entries, least recently used first (do not change the map while iterating)."""
        return iter(self._items.items())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items


class Protocol:
    id: ClassVar[int]
    name: ClassVar[str]
    stem: ClassVar[Stem | None] = None  # None: the plug-in counts its own metrics (record/collect)
    # Wire samples the kernel detector (bpf/include/l7/<name>.h) must recognise as this
    # protocol, and ones it must not: tests/unit/test_l7_contract.py runs the detector on them.
    kernel_requests: ClassVar[tuple[bytes, ...]] = ()
    kernel_non_requests: ClassVar[tuple[bytes, ...]] = ()
    # One-way messages (a publish, a delivery) the kernel's l7_message (bpf/include/l7/
    # protocols.h) must recognise as this protocol, read or written; they come to `feed`.
    kernel_messages: ClassVar[tuple[bytes, ...]] = ()
    # A stream protocol (contract.h): every read and write of a recognised connection — or, for
    # a one-way message protocol, every call that carries messages — comes to `feed` in order,
    # and the plug-in makes requests itself; `parse` is not called.
    streaming: ClassVar[bool] = False
    # True when span() depends only on the request's method, path and code, the peer and tls
    # (and the settings): the tracer then reuses a span's attributes for the same request to the
    # same peer instead of building them again (their dicts are shared, never changed)
    span_by_path: ClassVar[bool] = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def parse(self, conn: ConnKey, request: bytes, response: bytes, seconds: float) -> list[Request]:
        """The requests in a pair's first bytes, each with its status; [] if none."""
        raise NotImplementedError

    def feed(self, conn: ConnKey, client: bool, ts_ns: int, data: bytes, size: int) -> list[Request]:
        """Stream protocols: one call's first bytes (`data`) of its `size`, written by the client
        (`client`) or by the server; returns the requests this call completed."""
        raise NotImplementedError

    def span(self, r: Request, peer: Peer, tls: bool) -> Span | None:
        """The span of an outbound request, or None when it should not be one."""
        return None

    def sample_response(self, request: bytes) -> bytes:
        """A response `parse` pairs with this request: tests/unit/test_l7_contract.py parses each
        kernel sample with it. Empty unless a request counts only with its reply (ZooKeeper)."""
        return b""

    # Plug-ins with their own metrics (stem None) --------------------------------------
    def record(self, container_id: str, requests: list[Request], outbound: bool = True) -> None:
        """Count requests of a container, made by it (`outbound`) or served by it (called with
        the tracer's lock held)."""

    def collect(self, f: Families, apps: dict[str, str]) -> None:
        """Series of the plug-in's own metrics for containers in `apps` (id -> app_id)."""

    def forget(self, containers: set[str]) -> None:
        """Drop what is kept for containers the registry forgot."""

    def rename(self, old: str, new: str) -> None:
        """What is kept for container `old` is `new`'s (added to what `new` has)."""


def db_span(r: Request, system: str, name: str, operation: str = "") -> Span:
    """A database client span: db.system, db.statement (masked), db.operation when given; an
    error reply makes it an error with the server's code as the message; any other span keeps
    the unset status, as the node agent sets only errors."""
    attrs = {"db.system": system, "db.statement": r.statement}
    if operation:
        attrs["db.operation"] = operation
    s = Span(name, attrs)
    if r.status == "failed":
        s.status, s.message = "STATUS_CODE_ERROR", r.error
    return s
