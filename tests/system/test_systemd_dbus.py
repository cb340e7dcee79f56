"""The systemd client's D-Bus wire format against a real D-Bus peer: Debian's dbus-daemon, on a
socket of the test's own (systemd is not PID 1 on this test machine, so systemd itself cannot
be asked; tests/unit/test_systemd.py covers systemd's answers with a stand-in). The daemon's
own object has string-array properties, as systemd's TriggeredBy is one, and answers errors for
unknown ones, as systemd does for a unit without a Service interface."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from agent.containers.systemd import DbusClient, DbusError

pytestmark = pytest.mark.agent_without("profiling", "l7")  # tests/system/conftest.py: families its tests never read

BUS = "/org/freedesktop/DBus"
NAME = "org.freedesktop.DBus"


@pytest.fixture(scope="module")
def bus() -> Iterator[str]:
    if shutil.which("dbus-daemon") is None:
        pytest.fail("dbus-daemon is not installed: apt-get install dbus-daemon (scripts/setup.sh lists it)")
    d = tempfile.mkdtemp(prefix="ca-dbus-")
    p = subprocess.Popen(["dbus-daemon", "--session", "--nofork", f"--address=unix:path={d}/bus",
                          "--print-address=1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().startswith(f"unix:path={d}/bus")
        yield f"{d}/bus"
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_string_array_and_string_properties_and_errors_from_a_real_dbus_peer(bus: str) -> None:
    c = DbusClient(bus, hello=True)
    try:
        ifaces = c.get_property(BUS, NAME, "Interfaces", NAME)
        assert isinstance(ifaces, list) and "org.freedesktop.DBus.Monitoring" in ifaces
        names = c.call(BUS, NAME, "ListNames", "", [], NAME)
        assert NAME in names[0]  # type: ignore[operator]
        owner = c.call(BUS, NAME, "GetNameOwner", "s", [NAME], NAME)
        assert owner == [NAME]
        with pytest.raises(DbusError) as e:
            c.get_property(BUS, NAME, "NoSuchProperty", NAME)
        assert e.value.name == "org.freedesktop.DBus.Error.UnknownProperty"
        # The connection stays usable after an error.
        assert c.get_property(BUS, NAME, "Interfaces", NAME) == ifaces
    finally:
        c.close()
