"""systemd_triggered_by / systemd_type: the unit name and object path as systemd forms them, and
the D-Bus conversation the node agent has with systemd's private socket.

systemd is not PID 1 on this test machine (no /run/systemd/private), so no real unit can be
asked here: systemd's side is a stand-in that answers over a real unix socket with messages the
test packs byte by byte from the D-Bus specification (little-endian header, header fields
REPLY_SERIAL/SIGNATURE/ERROR_NAME, a variant body), with the property values a timer-started
oneshot service has (TriggeredBy=["backup.timer"], Type="oneshot"; a scope has no Service
interface: UnknownProperty). The client's marshalling is also checked against a real D-Bus
peer, dbus-daemon, in tests/system/test_systemd_dbus.py."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from agent.containers.systemd import (
    DbusClient,
    SystemdProperties,
    SystemdUnits,
    body_values,
    parse_message,
    systemd_properties,
    unit_of,
    unit_path,
)
from agent.metrics import Families
from agent.node.cgroups import CgroupCollector


def test_unit_of_a_container_id_is_the_node_agents() -> None:
    assert unit_of("/system.slice/backup.service") == "backup.service"
    assert unit_of("/system.slice/app.service/worker") == "app.service"
    assert unit_of("/user.slice/user-1000.slice/session-2.scope") == "session-2.scope"


def test_unit_object_paths_are_escaped_as_systemd_does() -> None:
    # Known systemd object paths (busctl tree org.freedesktop.systemd1 on a systemd host).
    assert unit_path("nginx.service") == "/org/freedesktop/systemd1/unit/nginx_2eservice"
    assert unit_path("systemd-journald.service") == "/org/freedesktop/systemd1/unit/systemd_2djournald_2eservice"
    assert unit_path("getty@tty1.service") == "/org/freedesktop/systemd1/unit/getty_40tty1_2eservice"
    assert unit_path("1x.service") == "/org/freedesktop/systemd1/unit/_31x_2eservice"  # a leading digit


# ----------------------------------------------------------- a stand-in systemd peer ---


def _align(buf: bytearray, n: int) -> None:
    buf += b"\0" * ((n - len(buf) % n) % n)


def _string(buf: bytearray, s: str) -> None:
    _align(buf, 4)
    buf += struct.pack("<I", len(s.encode())) + s.encode() + b"\0"


def packed_reply(mtype: int, reply_serial: int, signature: str, body: bytes, error: str = "") -> bytes:
    """A METHOD_RETURN (2) or ERROR (3), packed by the specification's rules."""
    fields = bytearray()
    if error:
        fields += b"\x04\x01s\x00"
        _string(fields, error)
        _align(fields, 8)
    fields += b"\x05\x01u\x00" + struct.pack("<I", reply_serial)
    _align(fields, 8)
    fields += b"\x08\x01g\x00" + bytes([len(signature)]) + signature.encode() + b"\0"
    msg = bytearray(struct.pack("<BBBBII", ord("l"), mtype, 0, 1, len(body), 1000 + reply_serial))
    msg += struct.pack("<I", len(fields)) + fields
    _align(msg, 8)
    return bytes(msg + body)


def variant_strings(values: list[str]) -> bytes:
    body = bytearray(b"\x02as\x00")
    items = bytearray()
    for v in values:
        _string(items, v)
    body += struct.pack("<I", len(items)) + items  # offset 4: aligned; strings align to 4
    return bytes(body)


def variant_string(value: str) -> bytes:
    body = bytearray(b"\x01s\x00")
    _string(body, value)
    return bytes(body)


def error_body(text: str) -> bytes:
    body = bytearray()
    _string(body, text)
    return bytes(body)


@dataclass
class FakeSystemd:
    """Units: object path -> {(interface, property): value}."""

    units: dict[str, dict[tuple[str, str], object]]
    path: str = ""
    asked: list[tuple[str, str, str]] = field(default_factory=list)
    auth: list[bytes] = field(default_factory=list)

    def serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n" not in data:
                data += conn.recv(256)
            self.auth.append(data)
            conn.sendall(b"OK 0123456789abcdef0123456789abcdef\r\n")
            data = b""
            while not data.startswith(b"BEGIN\r\n"):
                data += conn.recv(256)
            data = data[len(b"BEGIN\r\n"):]
            while True:
                got = parse_message(data)
                if got is None:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                    continue
                msg, n = got
                data = data[n:]
                iface, prop = body_values(msg)
                self.asked.append((msg.path, str(iface), str(prop)))
                value = self.units.get(msg.path, {}).get((str(iface), str(prop)))
                if value is None:
                    conn.sendall(packed_reply(3, msg.serial, "s", error_body(f"Unknown property {prop}"),
                                              error="org.freedesktop.DBus.Error.UnknownProperty"))
                elif isinstance(value, list):
                    conn.sendall(packed_reply(2, msg.serial, "v", variant_strings(value)))
                else:
                    conn.sendall(packed_reply(2, msg.serial, "v", variant_string(str(value))))


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    unit = "org.freedesktop.systemd1.Unit"
    fake = FakeSystemd({
        "/org/freedesktop/systemd1/unit/backup_2eservice": {
            (unit, "TriggeredBy"): ["backup.timer"], ("org.freedesktop.systemd1.Service", "Type"): "oneshot"},
        "/org/freedesktop/systemd1/unit/web_2eservice": {
            (unit, "TriggeredBy"): [], ("org.freedesktop.systemd1.Service", "Type"): "notify"},
        "/org/freedesktop/systemd1/unit/session_2d2_2escope": {(unit, "TriggeredBy"): []},
    })
    with tempfile.TemporaryDirectory() as d:
        fake.path = os.path.join(d, "private")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(fake.path)
        listener.listen(4)
        t = threading.Thread(target=fake.serve, args=(listener,), daemon=True)
        t.start()
        try:
            yield fake
        finally:
            listener.close()


def test_properties_of_a_timer_started_service_a_plain_one_and_a_scope(systemd: FakeSystemd) -> None:
    client = DbusClient(systemd.path)
    try:
        assert systemd_properties(client, "backup.service") == SystemdProperties("backup.service", "backup.timer", "oneshot")
        assert systemd_properties(client, "web.service") == SystemdProperties("web.service", "", "notify")
        assert systemd_properties(client, "session-2.scope") == SystemdProperties("session-2.scope", "", "")
    finally:
        client.close()
    assert systemd.auth == [b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n"]  # one connection
    assert systemd.asked[:2] == [
        ("/org/freedesktop/systemd1/unit/backup_2eservice", "org.freedesktop.systemd1.Unit", "TriggeredBy"),
        ("/org/freedesktop/systemd1/unit/backup_2eservice", "org.freedesktop.systemd1.Service", "Type")]


@dataclass
class _Container:
    id: str
    kind: str
    app_id: str = ""
    image: str = ""
    subsystems: dict[str, str] = field(default_factory=dict)
    cgroup_path: str = ""
    oom_kills: int = 0


class _Registry:
    layout = None

    def __init__(self, containers: list[_Container]) -> None:
        self._containers = containers

    def containers(self) -> list[_Container]:
        return self._containers


def test_container_info_carries_the_trigger_and_type(systemd: FakeSystemd) -> None:
    reg = _Registry([_Container("/system.slice/backup.service", "systemd"),
                     _Container("/system.slice/web.service", "systemd"),
                     _Container("/docker/db", "docker", image="postgres:16")])
    units = SystemdUnits(reg, client=DbusClient(systemd.path))  # type: ignore[arg-type]
    units.tick(0.0, [])
    units.tick(1.0, [])  # cached: not asked again
    assert units.lookups == 2 and units.errors == 0
    f = Families({})
    CgroupCollector(reg, systemd=units).collect(f)  # type: ignore[arg-type]
    info = {s.labels["container_id"]: (s.labels["systemd_triggered_by"], s.labels["systemd_type"], s.labels["image"])
            for fam in f for s in fam.samples if s.name == "container_info"}
    assert info == {"/system.slice/backup.service": ("backup.timer", "oneshot", ""),
                    "/system.slice/web.service": ("", "notify", ""),
                    "/docker/db": ("", "", "postgres:16")}
    reg._containers.pop(0)  # the registry forgot it: so does the cache
    units.tick(2.0, ["/system.slice/backup.service"])
    assert units.get("/system.slice/backup.service") is None
    units.close()


def test_no_systemd_socket_leaves_the_labels_empty_and_is_not_retried_within_a_tick(tmp_path: object) -> None:
    reg = _Registry([_Container(f"/system.slice/s{i}.service", "systemd") for i in range(5)])
    units = SystemdUnits(reg, procfs="/nonexistent")  # type: ignore[arg-type]
    units.tick(0.0, [])
    assert units.errors == 1 and units.props == {}


def test_an_unreachable_systemd_is_retried_with_backoff_not_every_tick() -> None:
    reg = _Registry([_Container("/system.slice/s.service", "systemd")])
    units = SystemdUnits(reg, procfs="/nonexistent")  # type: ignore[arg-type]
    tries = []
    for t in range(0, 40):  # a tick a second for 40 s: tries at 0, 5, 15 (+5, +10, then +20: 35)
        before = units.errors
        units.tick(float(t), [])
        if units.errors > before:
            tries.append(t)
    assert tries == [0, 5, 15, 35]
    assert units.props == {}
