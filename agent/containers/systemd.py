"""What systemd says of a service's unit: the unit that triggered it (a .timer, .path or
.socket: `TriggeredBy`) and its `Type`, as the node agent asks for them, for
`container_info{systemd_triggered_by,systemd_type}`.

Like the node agent, the agent talks to systemd itself over its private D-Bus socket
(`/run/systemd/private`, reached through the host's root: no dbus-daemon needed), authenticates
with EXTERNAL (its uid) and reads the properties of
`/org/freedesktop/systemd1/unit/<escaped unit>`: `TriggeredBy` (an array of unit names: the
first one, as the node agent takes it) on org.freedesktop.systemd1.Unit and `Type` on
org.freedesktop.systemd1.Service (a unit that is not a service has none: ""). The unit is the
first path element of the container id that ends in `.service`, else the last one.

The client is a small D-Bus client (the wire format of the D-Bus specification: little-endian
messages, the header fields, strings, signatures, arrays and variants it needs). Blocking, with
a timeout: called off the event path (`SystemdUnits.tick`, on the poll thread, a few lookups a
tick) and cached per unit for the container's life.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass

from agent.component import Component
from agent.containers.registry import Registry
from agent.metrics import Families

log = logging.getLogger(__name__)

PRIVATE_SOCKET = "/run/systemd/private"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
METHOD_CALL, METHOD_RETURN, ERROR = 1, 2, 3
F_PATH, F_INTERFACE, F_MEMBER, F_ERROR_NAME, F_REPLY_SERIAL, F_DESTINATION, F_SIGNATURE = 1, 2, 3, 4, 5, 6, 8


@dataclass(frozen=True)
class SystemdProperties:
    unit: str
    triggered_by: str = ""
    type: str = ""


def unit_of(container_id: str) -> str:
    parts = container_id.split("/")
    for p in parts:
        if p.endswith(".service"):
            return p
    return parts[-1]


def unit_path(unit: str) -> str:
    """The unit's object path: each byte that is not an ASCII letter or digit (and a leading
    digit) as _xx in hex (systemd's bus path escaping)."""
    out = []
    for i, b in enumerate(unit.encode()):
        c = chr(b)
        if c.isascii() and (c.isalpha() or (c.isdigit() and i > 0)):
            out.append(c)
        else:
            out.append(f"_{b:02x}")
    return "/org/freedesktop/systemd1/unit/" + ("".join(out) or "_")


class DbusError(Exception):
    def __init__(self, name: str, message: str = "") -> None:
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name


# ------------------------------------------------------------------------- marshalling ---


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def align(self, a: int) -> None:
        self.buf += b"\0" * _pad(len(self.buf), a)

    def byte(self, v: int) -> None:
        self.buf.append(v)

    def u32(self, v: int) -> None:
        self.align(4)
        self.buf += struct.pack("<I", v)

    def string(self, s: str) -> None:
        data = s.encode()
        self.u32(len(data))
        self.buf += data + b"\0"

    def signature(self, s: str) -> None:
        data = s.encode()
        self.byte(len(data))
        self.buf += data + b"\0"


class _Reader:
    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def align(self, a: int) -> None:
        self.pos += _pad(self.pos, a)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise DbusError("org.coroot.BadMessage", "truncated")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def byte(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        self.align(4)
        return int(struct.unpack("<I", self.take(4))[0])

    def string(self) -> str:
        n = self.u32()
        s = self.take(n + 1)[:n]
        return s.decode(errors="replace")

    def signature(self) -> str:
        n = self.byte()
        return self.take(n + 1)[:n].decode()

    def value(self, sig: str) -> object:
        """One value of a single complete type; the types systemd's properties and a message
        header use (strings, integers, booleans, arrays, structs, variants)."""
        t = sig[0]
        if t in "so":
            return self.string()
        if t == "g":
            return self.signature()
        if t == "y":
            return self.byte()
        if t in "bu":
            v = self.u32()
            return bool(v) if t == "b" else v
        if t == "i":
            self.align(4)
            return int(struct.unpack("<i", self.take(4))[0])
        if t in "nq":
            self.align(2)
            return int(struct.unpack("<h" if t == "n" else "<H", self.take(2))[0])
        if t in "xtd":
            self.align(8)
            return struct.unpack({"x": "<q", "t": "<Q", "d": "<d"}[t], self.take(8))[0]
        if t == "v":
            return self.value(self.signature())
        if t == "a":
            elem = _first_type(sig[1:])
            n = self.u32()
            self.align(8 if elem[0] in "({xtd" else _ALIGN.get(elem[0], 4))
            end = self.pos + n
            items = []
            while self.pos < end:
                items.append(self.value(elem))
            return items
        if t in "({":
            self.align(8)
            inner = sig[1:-1] if len(sig) > 1 else ""
            fields = []
            while inner:
                one = _first_type(inner)
                fields.append(self.value(one))
                inner = inner[len(one):]
            return tuple(fields)
        raise DbusError("org.coroot.BadMessage", f"type {t!r} not handled")


_ALIGN = {"y": 1, "g": 1, "v": 1, "n": 2, "q": 2, "b": 4, "i": 4, "u": 4, "s": 4, "o": 4, "a": 4, "h": 4}


def _first_type(sig: str) -> str:
    """The first complete type of a signature."""
    if not sig:
        raise DbusError("org.coroot.BadMessage", "empty signature")
    if sig[0] == "a":
        return "a" + _first_type(sig[1:])
    if sig[0] in "({":
        depth = 0
        for i, c in enumerate(sig):
            if c in "({":
                depth += 1
            elif c in ")}":
                depth -= 1
                if depth == 0:
                    return sig[: i + 1]
        raise DbusError("org.coroot.BadMessage", f"unbalanced signature {sig!r}")
    return sig[0]


def method_call(serial: int, path: str, interface: str, member: str, destination: str | None,
                signature: str, args: list[str]) -> bytes:
    """A METHOD_CALL message whose arguments are all strings."""
    body = _Writer()
    for a in args:
        body.string(a)
    fields: list[tuple[int, str, str]] = [(F_PATH, "o", path), (F_INTERFACE, "s", interface),
                                          (F_MEMBER, "s", member)]
    if destination:
        fields.append((F_DESTINATION, "s", destination))
    if signature:
        fields.append((F_SIGNATURE, "g", signature))
    h = _Writer()
    h.buf += struct.pack("<BBBBII", ord("l"), METHOD_CALL, 0, 1, len(body.buf), serial)
    arr = _Writer()
    for code, sig, value in fields:
        arr.align(8)
        arr.byte(code)
        arr.signature(sig)
        if sig == "g":
            arr.signature(value)
        else:
            # The array starts at offset 16 of the message: 8-aligned, so its alignment holds.
            arr.string(value)
    h.u32(len(arr.buf))
    h.buf += arr.buf
    h.align(8)
    return bytes(h.buf + body.buf)


@dataclass
class Message:
    type: int
    serial: int
    reply_serial: int
    error_name: str
    signature: str
    body: bytes
    path: str = ""
    member: str = ""


def parse_message(data: bytes) -> tuple[Message, int] | None:
    """The first message in `data` and its length, or None if `data` holds less than one."""
    if len(data) < 16:
        return None
    if data[0:1] != b"l":
        raise DbusError("org.coroot.BadMessage", "big-endian messages are not handled")
    mtype, _flags, _ver, body_len, serial, fields_len = struct.unpack_from("<BBBIII", data, 1)
    header_end = 16 + fields_len
    total = header_end + _pad(header_end, 8) + body_len
    if len(data) < total:
        return None
    r = _Reader(data[:header_end], 16)
    reply_serial, error_name, signature, path, member = 0, "", "", "", ""
    while r.pos < header_end:
        r.align(8)
        if r.pos >= header_end:
            break
        code = r.byte()
        value = r.value("v")
        if code == F_REPLY_SERIAL and isinstance(value, int):
            reply_serial = value
        elif code == F_ERROR_NAME and isinstance(value, str):
            error_name = value
        elif code == F_SIGNATURE and isinstance(value, str):
            signature = value
        elif code == F_PATH and isinstance(value, str):
            path = value
        elif code == F_MEMBER and isinstance(value, str):
            member = value
    body = data[total - body_len : total]
    return Message(mtype, serial, reply_serial, error_name, signature, body, path, member), total


def body_values(msg: Message) -> list[object]:
    r = _Reader(msg.body)
    out = []
    sig = msg.signature
    while sig:
        one = _first_type(sig)
        out.append(r.value(one))
        sig = sig[len(one):]
    return out


# ------------------------------------------------------------------------------ client ---


class DbusClient:
    """One connection to a D-Bus peer: systemd's private socket (peer to peer), or a bus
    (`hello=True`: the bus wants Hello first). Not thread-safe."""

    def __init__(self, path: str, timeout: float = 1.0, hello: bool = False) -> None:
        self.path = path
        self.timeout = timeout
        self.hello = hello
        self._sock: socket.socket | None = None
        self._serial = 0
        self._buf = b""

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
            s.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
            line = b""
            while not line.endswith(b"\r\n"):
                chunk = s.recv(256)
                if not chunk:
                    raise ConnectionError("the peer closed the connection during authentication")
                line += chunk
            if not line.startswith(b"OK "):
                raise DbusError("org.coroot.AuthFailed", line.decode(errors="replace").strip())
            s.sendall(b"BEGIN\r\n")
        except BaseException:
            s.close()
            raise
        self._sock, self._buf = s, b""
        if self.hello:
            self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", "", [],
                      destination="org.freedesktop.DBus")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, path: str, interface: str, member: str, signature: str, args: list[str],
             destination: str | None = None) -> list[object]:
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        self._serial += 1
        serial = self._serial
        sock.sendall(method_call(serial, path, interface, member, destination, signature, args))
        while True:
            got = parse_message(self._buf)
            if got is None:
                chunk = sock.recv(65536)
                if not chunk:
                    self.close()
                    raise ConnectionError("the peer closed the connection")
                self._buf += chunk
                continue
            msg, n = got
            self._buf = self._buf[n:]
            if msg.reply_serial != serial or msg.type not in (METHOD_RETURN, ERROR):
                continue  # signals, or the answer to a call that timed out
            if msg.type == ERROR:
                text = body_values(msg)
                raise DbusError(msg.error_name, str(text[0]) if text else "")
            return body_values(msg)

    def get_property(self, path: str, interface: str, name: str, destination: str | None = None) -> object:
        values = self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, name],
                           destination=destination)
        return values[0] if values else None


def systemd_properties(client: DbusClient, unit: str) -> SystemdProperties:
    """TriggeredBy and Type of a unit, as the node agent reads them (the first trigger)."""
    path = unit_path(unit)
    triggers = client.get_property(path, UNIT_IFACE, "TriggeredBy", "org.freedesktop.systemd1")
    triggered_by = str(triggers[0]) if isinstance(triggers, list) and triggers else ""
    try:
        kind = client.get_property(path, SERVICE_IFACE, "Type", "org.freedesktop.systemd1")
    except DbusError as e:
        if "Unknown" not in e.name:  # UnknownInterface/UnknownProperty: not a service
            raise
        kind = ""
    return SystemdProperties(unit, triggered_by, str(kind or ""))


RETRY_MIN, RETRY_MAX = 5.0, 300.0  # seconds between tries while systemd is unreachable


class SystemdUnits(Component):
    """Looks up the systemd properties of systemd containers, a few per tick, once each."""

    name = "systemd"

    def __init__(self, registry: Registry, procfs: str = "/proc", per_tick: int = 8,
                 client: DbusClient | None = None) -> None:
        self.registry = registry
        host_root = os.path.join(procfs, "1", "root")
        self.client = client if client is not None else DbusClient(host_root + PRIVATE_SOCKET)
        self.per_tick = per_tick
        self.props: dict[str, SystemdProperties] = {}
        self.failed: set[str] = set()
        self.lookups = 0
        self.errors = 0
        self._warned = False
        self._retry_at = 0.0  # systemd unreachable: not asked again before this (monotonic)
        self._backoff = RETRY_MIN

    def get(self, container_id: str) -> SystemdProperties | None:
        return self.props.get(container_id)

    def tick(self, now: float, gone: list[str]) -> None:
        for cid in gone:
            self.props.pop(cid, None)
            self.failed.discard(cid)
        if now < self._retry_at:
            return
        budget = self.per_tick
        for c in self.registry.containers():
            if budget <= 0:
                break
            if c.kind != "systemd" or c.id in self.props or c.id in self.failed:
                continue
            budget -= 1
            self.lookups += 1
            try:
                self.props[c.id] = systemd_properties(self.client, unit_of(c.id))
            except (OSError, DbusError) as e:
                self.errors += 1
                self.client.close()
                if isinstance(e, DbusError):
                    self.failed.add(c.id)  # systemd answered: it has no such unit
                    continue
                if not self._warned:
                    log.info("systemd not reachable at %s (%s): systemd_triggered_by stays empty; "
                             "retried with backoff", self.client.path, e)
                    self._warned = True
                # A systemd that does not answer costs the poll thread up to the client's
                # timeout: at most once per backoff period, which doubles up to RETRY_MAX.
                self._retry_at = now + self._backoff
                self._backoff = min(self._backoff * 2, RETRY_MAX)
                return
            self._backoff = RETRY_MIN

    def self_metrics(self, f: Families) -> None:
        f.counter("coroot_agent_systemd_lookups_total", "systemd unit property lookups", self.lookups)
        f.counter("coroot_agent_systemd_errors_total", "systemd unit property lookups that failed", self.errors)

    def close(self) -> None:
        self.client.close()
