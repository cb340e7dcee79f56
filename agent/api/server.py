"""The agent's HTTP API: /metrics (prometheus-client exposition of the agent's own registry),
/healthz, and /api/* routes that other modules register.

Trust: on TCP every /api/* request needs the API key in X-Api-Key (loopback is not trusted: any
local user can reach it); without a configured key the TCP API answers 403. The unix socket
(mode 0600 root, or 0660 and a configured group) serves the same routes without a key, and
checks the peer's credentials (SO_PEERCRED) once more.

Robustness: one asyncio event-loop thread reads and parses every request with header, body and
idle deadlines, answers /healthz inline, and refuses bad framing (missing, negative, non-numeric
or oversized Content-Length, Transfer-Encoding, oversized header blocks) before reading any body
byte, and only after the path and the key were checked. At most `max_connections` are open:
when full, a connection is closed to make room (counted): first one lingering after a refusal,
then the one that has waited longest without sending a complete request, then the oldest answer
stuck on a client that does not read; only when every slot is inside a handler is the new one
refused (counted). /metrics and /api/* run on two small bounded worker pools (daemon threads);
a full queue answers 503. health() runs on the event loop: it must not block.

This module serves; it collects nothing itself and knows nothing about what the routes do.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import hmac
import http
import json
import logging
import os
import queue
import socket
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.metrics import generate_latest

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024        # request line + headers
MAX_HEADERS = 100
READ_CHUNK = 64 * 1024
STREAM_LIMIT = 32 * 1024    # the transport stops reading past twice this many unread bytes
BACKLOG = 1024
LINGER_SECONDS = 0.5        # after refusing a request whose body is still coming: let the
LINGER_BYTES = 8 << 20      # client read the answer before the close turns into a reset (the
                            # socket buffers of a fast client hold MBs sent before the answer)
METRICS_WORKERS = 2
METRICS_QUEUE = 8
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
TIMEOUT_PHASES = ("header", "body", "idle", "write")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


ApiHandler = Callable[[str, bytes], Response]  # (query string, body) -> response


# ------------------------------------------------------------------ parsing --


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str                 # "HTTP/1.0" or "HTTP/1.1"
    headers: dict[str, str]      # lower-case names; repeated headers joined with ", "

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_METHOD_MAX = 16


def _is_token(b: bytes) -> bool:
    return bool(b) and all(c in _TCHAR for c in b)


def parse_head(data: bytes) -> Request | Refusal:
    """Parse a request head (request line and headers, without the blank line that ends it).
    Any input gives a Request or a Refusal (the status to answer); nothing raises."""
    if len(data) > MAX_HEAD:
        return Refusal(431, f"the request head is over {MAX_HEAD} bytes")
    lines = data.split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        return Refusal(431, f"more than {MAX_HEADERS} headers")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return Refusal(400, "a request line is METHOD TARGET HTTP/1.1")
    method, target, version = parts
    if not _is_token(method) or len(method) > _METHOD_MAX:
        return Refusal(400, "bad method")
    if not target.startswith(b"/") or any(c <= 0x20 or c >= 0x7F for c in target):
        return Refusal(400, "the target must be a path starting with /, in ASCII (percent-encode the rest)")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/") and len(version) == 8 and version[5:6].isdigit():
            return Refusal(505, "only HTTP/1.0 and HTTP/1.1 are served")
        return Refusal(400, "bad protocol version")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            return Refusal(400, "folded header lines are not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not _is_token(name):
            return Refusal(400, "a malformed header line")
        value = value.strip(b" \t")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            return Refusal(400, "a control character in a header value")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            if key == "content-length":
                if headers[key] != text:
                    return Refusal(400, "conflicting Content-Length headers")
                continue
            if key == "host":
                return Refusal(400, "more than one Host header")
            text = headers[key] + ", " + text
        headers[key] = text
    return Request(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers)


def body_length(req: Request) -> int | None | Refusal:
    """The declared body length: an int, None when none is declared, or a Refusal."""
    if "transfer-encoding" in req.headers:
        return Refusal(501, "Transfer-Encoding is not supported: send Content-Length")
    cl = req.headers.get("content-length")
    if cl is None:
        return None
    if not (cl.isascii() and cl.isdigit()) or len(cl) > 18:
        return Refusal(400, "Content-Length must be a non-negative integer")
    return int(cl)


# ---------------------------------------------------------------- sockets --


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host (a name, an IPv4 or an IPv6 literal, bracketed or not)."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    infos = socket.getaddrinfo(h or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and h == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # every address, v4 too
        s.bind(addr)
        s.listen(BACKLOG)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def resolve_group(group: str) -> int:
    g = group.strip()
    if g.isascii() and g.isdigit():
        return int(g)
    try:
        return grp.getgrnam(g).gr_gid
    except KeyError:
        raise OSError(errno.EINVAL, f"no group named {g!r}") from None


def bind_unix(path: str, gid: int | None) -> tuple[socket.socket, tuple[int, int]]:
    """A listening unix socket at `path`, mode 0600 (0660 and group `gid` when given).

    The socket is bound under umask 0177, so it is never connectable by others, not even for
    an instant; a stale socket at `path` is removed, anything else there is left alone and
    refused. Returns the socket and the file's (st_dev, st_ino), to remove only our own file."""
    parent = os.path.dirname(os.path.abspath(path))
    pst = os.stat(parent)
    if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
        raise OSError(errno.EPERM, f"{parent} is writable by every user and has no sticky bit, so anyone "
                                   "could replace the API socket; put it in a directory only root can write")
    try:
        lst: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        lst = None
    if lst is not None:
        if not stat.S_ISSOCK(lst.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(path)
        except OSError:
            pass  # nobody serves it: a leftover of an agent that did not stop cleanly
        else:
            raise OSError(errno.EADDRINUSE, f"another process serves on {path}")
        finally:
            probe.close()
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)  # group first, then the group's access
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        st = os.lstat(path)
        s.listen(BACKLOG)
        s.setblocking(False)
    except BaseException:
        s.close()
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except OSError:
            pass
        raise
    return s, (st.st_dev, st.st_ino)


def peer_groups(pid: int, uid: int) -> set[int]:
    """The groups (real, effective and supplementary) of process `pid`, if it still runs as
    `uid`; empty when it cannot be read (gone, or its pid reused by someone else)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read(16384).decode("ascii", "replace")
    except OSError:
        return set()
    uids: list[int] = []
    groups: set[int] = set()
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        try:
            values = [int(v) for v in rest.split()]
        except ValueError:
            continue
        if name == "Uid":
            uids = values
        elif name == "Gid":
            groups.update(values[:2])
        elif name == "Groups":
            groups.update(values)
    return groups if uid in uids[:2] else set()


# ------------------------------------------------------------------- pools --


class _Pool:
    """A fixed set of daemon threads over a bounded queue: a full queue refuses at once, and a
    handler that never returns cannot hold the process at exit."""

    def __init__(self, name: str, workers: int, queue_size: int) -> None:
        self.name = name
        self._q: queue.Queue[tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop] | None] = \
            queue.Queue(maxsize=max(1, queue_size))
        self._threads = [threading.Thread(target=self._run, name=f"api-{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for _ in self._threads:
            try:
                self._q.put_nowait(None)
            except queue.Full:
                break  # daemon threads: they go with the process

    def submit(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any] | None:
        fut: asyncio.Future[Any] = loop.create_future()
        try:
            self._q.put_nowait((fn, fut, loop))
        except queue.Full:
            return None
        return fut

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, fut, loop = item
            try:
                result, exc = fn(), None
            except Exception as e:  # noqa: BLE001 - reported to the request, logged there
                result, exc = None, e
            try:
                loop.call_soon_threadsafe(_settle, fut, result, exc)
            except RuntimeError:
                pass  # the loop is closed: the server stopped


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


# ------------------------------------------------------------ connections --


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(eq=False)
class _Conn:
    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    unix: bool
    peer: str
    opened: float
    trusted_peer: bool = False
    http10: bool = False
    buf: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        if not self.writer.transport.is_closing():
            self.writer.transport.close()


def _json_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class ApiServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, api_key: str = "",
                 health: Callable[[], tuple[bool, str]] | None = None, *, unix_path: str | None = None,
                 unix_group: str = "", max_body: int = 1 << 20, header_timeout: float = 10.0,
                 body_timeout: float = 10.0, max_connections: int = 256, workers: int = 4,
                 idle_timeout: float = 30.0, write_timeout: float = 30.0, queue_size: int = 16) -> None:
        self.registry = registry
        self.api_key = api_key
        self.health = health or (lambda: (True, "ok"))
        self.routes: dict[str, ApiHandler] = {}
        self.max_body = max_body
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.max_connections = max(1, max_connections)
        self.unix_path = unix_path
        self.unix_group = unix_group
        self._gid = resolve_group(unix_group) if unix_group else None
        self._tcp = bind_tcp(host, port)
        self._addr = self._tcp.getsockname()
        self._unix: socket.socket | None = None
        self._unix_id: tuple[int, int] | None = None
        if unix_path:
            try:
                self._unix, self._unix_id = bind_unix(unix_path, self._gid)
            except BaseException:
                self._tcp.close()
                raise
        self._api_pool = _Pool("handler", workers, queue_size)
        self._metrics_pool = _Pool("metrics", METRICS_WORKERS, METRICS_QUEUE)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._conns: dict[int, _Conn] = {}
        # Evictable, oldest first: no complete request yet (or lingering after a refusal) ...
        self._waiting: OrderedDict[int, _Conn] = OrderedDict()
        # ... and, when none of those is left, answers stuck on a client that does not read.
        self._writing: OrderedDict[int, _Conn] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self.stats = _Stats()

    # ---------------------------------------------------------------- surface --

    @property
    def port(self) -> int:
        return int(self._addr[1])

    @property
    def host(self) -> str:
        return str(self._addr[0])

    def route(self, path: str, handler: ApiHandler) -> None:
        if not path.startswith("/api/"):
            raise ValueError("routes live under /api/")
        self.routes[path] = handler

    def collector(self) -> _ServerCollector:
        return _ServerCollector(self)

    def open_connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._api_pool.start()
        self._metrics_pool.start()
        self._thread = threading.Thread(target=self._run_loop, name="api", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the API server did not start within 5 s")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(self._begin_stop)
            except RuntimeError:
                pass
            thread.join(0.8)
        self._thread = None
        self._api_pool.stop()
        self._metrics_pool.stop()
        self._tcp.close()
        if self._unix is not None:
            self._unix.close()
            self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        if not self.unix_path or self._unix_id is None:
            return
        try:
            st = os.lstat(self.unix_path)
            if (st.st_dev, st.st_ino) == self._unix_id:
                os.unlink(self.unix_path)
        except OSError:
            pass
        self._unix_id = None

    # ------------------------------------------------------------- event loop --

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_loop_exception)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:  # noqa: BLE001 - the server's own failure, not a client's
            log.exception("the API server stopped")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        servers = [await asyncio.start_server(self._accept_tcp, sock=self._tcp, limit=STREAM_LIMIT,
                                              backlog=BACKLOG)]
        if self._unix is not None:
            servers.append(await asyncio.start_unix_server(self._accept_unix, sock=self._unix,
                                                           limit=STREAM_LIMIT, backlog=BACKLOG))
        self._ready.set()
        await self._stopping.wait()
        for srv in servers:
            srv.close()
        for conn in list(self._conns.values()):
            conn.writer.transport.abort()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=0.3)

    def _begin_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _accept_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        await self._accept(reader, writer, False, f"{peer[0]}:{peer[1]}" if peer else "?")

    async def _accept_unix(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._accept(reader, writer, True, "unix")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, unix: bool,
                      peer: str) -> None:
        loop = asyncio.get_running_loop()
        self.stats.accepted += 1
        if len(self._conns) >= self.max_connections:
            pool = self._waiting or self._writing
            if not pool:
                self.stats.refused += 1
                log.debug("refused %s: %d connections are busy", peer, len(self._conns))
                writer.transport.abort()
                return
            _, victim = pool.popitem(last=False)
            self._forget(victim)
            victim.closed = True
            victim.writer.transport.abort()  # frees the slot now, even with an answer unsent
            self.stats.evicted += 1
            log.debug("closed %s to make room (open %.1fs)", victim.peer, loop.time() - victim.opened)
        self._next_id += 1
        conn = _Conn(self._next_id, reader, writer, unix, peer, loop.time())
        if unix:
            conn.trusted_peer = self._peer_allowed(writer)
            if not conn.trusted_peer:
                peer = conn.peer = "unix (untrusted peer)"
        self._conns[conn.id] = conn
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(conn)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, TimeoutError) as e:
            log.debug("%s went away: %s", peer, e)
        except OSError as e:
            log.debug("%s: %s", peer, e)
        except Exception:  # noqa: BLE001 - a bug here must not stop the server
            log.exception("serving %s", peer)
        finally:
            self._forget(conn)
            conn.close()
            if task is not None:
                self._tasks.discard(task)

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.id, None)
        self._waiting.pop(conn.id, None)
        self._writing.pop(conn.id, None)

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
        except (OSError, struct.error, AttributeError):
            return False
        if uid == 0:
            return True
        if self._gid is None:
            return False
        return gid == self._gid or self._gid in peer_groups(pid, uid)

    # ------------------------------------------------------------ one request --

    async def _serve(self, conn: _Conn) -> None:
        idle = False
        while not conn.closed:
            self._waiting[conn.id] = conn
            self._waiting.move_to_end(conn.id)
            head = await self._read_head(conn, idle)
            self._waiting.pop(conn.id, None)
            if head is None or conn.closed:
                return
            if not await self._handle(conn, head):
                return
            idle = True

    async def _read_head(self, conn: _Conn, idle: bool) -> bytes | None:
        """The next request head, or None when the connection is to be closed (the client went
        away, a timeout: answered here when something can be)."""
        loop = asyncio.get_running_loop()
        buf = conn.buf
        if idle and not buf:
            phase, deadline = "idle", loop.time() + self.idle_timeout
        else:
            phase, deadline = "header", (loop.time() if idle else conn.opened) + self.header_timeout
        scan = 0
        try:
            async with asyncio.timeout_at(deadline) as cm:
                while True:
                    i = buf.find(b"\r\n\r\n", max(0, scan - 3))
                    if i >= 0:
                        head = bytes(buf[:i])
                        del buf[:i + 4]
                        scan = 0
                        head = head.lstrip(b"\r\n")  # stray blank lines between requests
                        if not head:
                            continue
                        return head
                    if len(buf) > MAX_HEAD:
                        await self._refuse(conn, 431, f"the request head is over {MAX_HEAD} bytes")
                        return None
                    scan = len(buf)
                    chunk = await conn.reader.read(READ_CHUNK)
                    if not chunk:
                        if buf.strip(b"\r\n") and not conn.closed:
                            await self._refuse(conn, 400, "the request head was cut off")
                        return None
                    if phase == "idle":
                        phase = "header"
                        cm.reschedule(loop.time() + self.header_timeout)
                    buf += chunk
        except TimeoutError:
            self.stats.timeouts[phase] += 1
            log.debug("%s: %s timeout", conn.peer, phase)
            if phase == "header" and buf:
                await self._refuse(conn, 408, "the request head took too long")
            return None

    async def _handle(self, conn: _Conn, head: bytes) -> bool:
        """Answer one request; True when the connection may carry another."""
        parsed = parse_head(head)
        if isinstance(parsed, Refusal):
            await self._refuse(conn, parsed.status, parsed.message)
            return False
        req = parsed
        path, query = req.path, req.query
        length = body_length(req)
        # Whether body bytes follow that will not be read: then the connection cannot be reused.
        unread = isinstance(length, Refusal) or (isinstance(length, int) and length > 0)
        head_only = req.method == "HEAD"
        keep_ok = req.keep_alive and not unread
        conn.http10 = req.version == "HTTP/1.0"

        if path in ("/metrics", "/healthz"):
            if unread:
                status = length.status if isinstance(length, Refusal) else 400
                await self._refuse(conn, status, f"{path} takes no request body")
                return False
            if req.method not in ("GET", "HEAD"):
                await self._respond(conn, 405, _json_error(f"{path} answers GET"), keep=req.keep_alive,
                                    extra=(("Allow", "GET, HEAD"),))
                return req.keep_alive
            keep = req.keep_alive
            if path == "/healthz":
                try:
                    ok, msg = self.health()
                except Exception:  # noqa: BLE001 - a broken health check is an unhealthy agent
                    log.exception("health check")
                    ok, msg = False, "the health check failed"
                await self._respond(conn, 200 if ok else 503, (msg + "\n").encode(), "text/plain",
                                    keep=keep, head_only=head_only)
                return keep
            resp = await self._run_in(self._metrics_pool, lambda: Response(200, generate_latest(self.registry),
                                                                           CONTENT_TYPE_LATEST))
            await self._respond(conn, resp.status, resp.body, resp.content_type, keep=keep, head_only=head_only)
            return keep

        if not path.startswith("/api/"):
            await self._respond(conn, 404, _json_error(f"no such path: {path[:200]}"), keep=keep_ok)
            if unread:
                await self._linger(conn)
            return keep_ok

        # /api/*: who is asking, before a single body byte is read.
        denied = self._deny(conn, req)
        if denied is not None:
            await self._respond(conn, denied.status, _json_error(denied.message), keep=keep_ok)
            if unread:
                await self._linger(conn)
            return keep_ok
        handler = self.routes.get(path)
        if handler is None:
            await self._respond(conn, 404, _json_error(f"no such API: {path[:200]}"), keep=keep_ok)
            if unread:
                await self._linger(conn)
            return keep_ok
        if req.method not in ("GET", "POST"):
            await self._respond(conn, 405, _json_error("the API answers GET and POST"), keep=keep_ok,
                                extra=(("Allow", "GET, POST"),))
            if unread:
                await self._linger(conn)
            return keep_ok
        if isinstance(length, Refusal):
            await self._refuse(conn, length.status, length.message)
            return False
        if length is None:
            if req.method == "POST":
                await self._refuse(conn, 411, "a POST needs Content-Length")
                return False
            length = 0
        if length > self.max_body:
            await self._refuse(conn, 413, f"the body is over {self.max_body} bytes")
            return False
        body = await self._read_body(conn, length)
        if body is None:
            return False
        resp = await self._run_in(self._api_pool, lambda: handler(query, body))
        keep = req.keep_alive
        await self._respond(conn, resp.status, resp.body, resp.content_type, keep=keep)
        return keep

    def _deny(self, conn: _Conn, req: Request) -> Refusal | None:
        if conn.unix:
            if conn.trusted_peer:
                return None
            who = f"root or members of group {self.unix_group}" if self.unix_group else "root"
            return Refusal(403, f"this socket serves {who} only")
        if not self.api_key:
            where = f"the local socket {self.unix_path}" if self.unix_path else "the local socket"
            return Refusal(403, f"the API is closed on TCP: the agent has no api_key; set api_key (--api-key) "
                                f"and send it as X-Api-Key, or use {where}")
        key = req.headers.get("x-api-key", "").encode("latin-1")
        if not hmac.compare_digest(key, self.api_key.encode()):
            return Refusal(401, "an X-Api-Key header with the agent's API key is required")
        return None

    async def _read_body(self, conn: _Conn, length: int) -> bytes | None:
        buf = conn.buf
        try:
            async with asyncio.timeout(self.body_timeout):
                while len(buf) < length:
                    chunk = await conn.reader.read(min(READ_CHUNK, length - len(buf)))
                    if not chunk:  # a half-close can still read the answer
                        log.debug("%s: the body was cut off", conn.peer)
                        await self._respond(conn, 400, _json_error(f"the body ended after {len(buf)} of "
                                                                   f"{length} bytes"), keep=False)
                        return None
                    buf += chunk
        except TimeoutError:
            self.stats.timeouts["body"] += 1
            log.debug("%s: body timeout", conn.peer)
            await self._refuse(conn, 408, "the request body took too long", linger=False)
            return None
        body = bytes(buf[:length])
        del buf[:length]
        return body

    async def _run_in(self, pool: _Pool, fn: Callable[[], Response]) -> Response:
        loop = asyncio.get_running_loop()
        fut = pool.submit(fn, loop)
        if fut is None:
            self.stats.busy[pool.name] = self.stats.busy.get(pool.name, 0) + 1
            return Response(503, _json_error("the agent is busy: too many requests queued; retry"))
        try:
            resp = await fut
        except Exception:  # noqa: BLE001 - a broken handler must not kill the server
            log.exception("a request handler failed")
            return Response(500, _json_error("internal error"))
        if not isinstance(resp, Response):
            log.error("a request handler returned %s, not a Response", type(resp).__name__)
            return Response(500, _json_error("internal error"))
        return resp

    async def _refuse(self, conn: _Conn, status: int, message: str, linger: bool = True) -> None:
        """Answer an error and close; the rest of the request is never read."""
        await self._respond(conn, status, _json_error(message), keep=False)
        if linger:
            await self._linger(conn)

    async def _linger(self, conn: _Conn) -> None:
        """Half-close, then discard (never keep) what the client still sends, briefly: closing
        with unread bytes resets the connection, and a reset can reach the client before it read
        the answer."""
        transport = conn.writer.transport
        if transport.is_closing():
            return
        self._waiting[conn.id] = conn
        self._waiting.move_to_end(conn.id, last=False)  # the first to go if room is needed
        try:
            if conn.writer.can_write_eof():
                conn.writer.write_eof()
            seen = len(conn.buf)
            conn.buf.clear()
            async with asyncio.timeout(LINGER_SECONDS):
                while seen < LINGER_BYTES:
                    chunk = await conn.reader.read(READ_CHUNK)
                    if not chunk:
                        break
                    seen += len(chunk)
        except (TimeoutError, OSError):
            pass
        conn.close()

    async def _respond(self, conn: _Conn, status: int, body: bytes, content_type: str = "application/json", *,
                       keep: bool, head_only: bool = False,
                       extra: tuple[tuple[str, str], ...] = ()) -> None:
        transport = conn.writer.transport
        if transport.is_closing():
            conn.closed = True
            return
        self.stats.requests[CODE_CLASSES[min(max(status // 100, 1), 5) - 1]] += 1
        log.debug("%s -> %d", conn.peer, status)
        lines = [f"HTTP/1.1 {status} {_reason(status)}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}", "X-Content-Type-Options: nosniff"]
        lines += [f"{k}: {v}" for k, v in extra]
        if not keep:
            lines.append("Connection: close")
        elif conn.http10:
            lines.append("Connection: keep-alive")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        conn.writer.write(data if head_only else data + body)
        self._writing[conn.id] = conn
        try:
            async with asyncio.timeout(self.write_timeout):
                await conn.writer.drain()
        except TimeoutError:
            self.stats.timeouts["write"] += 1
            log.debug("%s: write timeout", conn.peer)
            transport.abort()
            conn.closed = True
            return
        finally:
            self._writing.pop(conn.id, None)
        if not keep:
            conn.closed = True


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    if isinstance(exc, OSError):  # a client that went away at an awkward moment
        log.debug("api: %s: %s", context.get("message"), exc)
        return
    log.error("api event loop: %s", context.get("message"), exc_info=exc)


@dataclass
class _Stats:
    accepted: int = 0
    evicted: int = 0
    refused: int = 0
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CODE_CLASSES, 0))
    timeouts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIMEOUT_PHASES, 0))
    busy: dict[str, int] = field(default_factory=lambda: {"handler": 0, "metrics": 0})


class _ServerCollector:
    """The server's own counters, read at scrape time."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server.stats
        yield GaugeMetricFamily("coroot_agent_api_connections", "connections open to the HTTP API now",
                                value=self.server.open_connections())
        yield CounterMetricFamily("coroot_agent_api_connections_accepted_total", "connections accepted",
                                  value=s.accepted)
        yield CounterMetricFamily("coroot_agent_api_connections_evicted_total",
                                  "connections closed to make room: no complete request yet, the longest waiting",
                                  value=s.evicted)
        yield CounterMetricFamily("coroot_agent_api_connections_refused_total",
                                  "connections refused: every slot busy with a request", value=s.refused)
        req = CounterMetricFamily("coroot_agent_api_requests_total", "requests answered, by status class",
                                  labels=["code"])
        for code, n in list(s.requests.items()):
            req.add_metric([code], n)
        yield req
        to = CounterMetricFamily("coroot_agent_api_timeouts_total",
                                 "connections closed by a deadline: header, body, idle keep-alive, write",
                                 labels=["phase"])
        for phase, n in list(s.timeouts.items()):
            to.add_metric([phase], n)
        yield to
        busy = CounterMetricFamily("coroot_agent_api_busy_total", "requests answered 503: the pool's queue was full",
                                   labels=["pool"])
        for pool, n in list(s.busy.items()):
            busy.add_metric([pool], n)
        yield busy


__all__ = ["ApiHandler", "ApiServer", "Refusal", "Request", "Response", "body_length", "parse_head"]
