"""The .NET diagnostics IPC client's pieces and the nettrace reader, on bytes recorded from the
real .NET Core 3.1.23 runtime (tests/unit/data/dotnet31_system_runtime.nettrace: a System.Runtime
EventCounters session at EventCounterIntervalSec=1, cut after ~4 s, so it ends mid-object) and
on garbage: the reader raises nettrace.Invalid and nothing else."""

from __future__ import annotations

import io
import os
import socket
import struct
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.runtime import dotnet, nettrace

DATA = Path(__file__).parent / "data" / "dotnet31_system_runtime.nettrace"


def events_of(data: bytes) -> tuple[list[nettrace.Event], nettrace.Reader, str]:
    r = nettrace.Reader(io.BytesIO(data).read)
    out: list[nettrace.Event] = []
    err = ""
    try:
        r.open()
        while not r.ended:
            out += r.next_block()
    except nettrace.Invalid as e:
        err = str(e)
    return out, r, err


def test_recorded_session_decodes_every_counter() -> None:
    evs, r, err = events_of(DATA.read_bytes())
    assert err.startswith("stream ended")  # the recording was cut
    assert len(evs) == 95
    assert {md.provider for md in r.metadata.values()} == {"System.Runtime"}
    first = evs[0].values
    assert first["Name"] == "cpu-usage" and first["CounterType"] == "Mean" and first["DisplayUnits"] == "%"
    names = [e.values["Name"] for e in evs[:19]]
    assert names[:3] == ["cpu-usage", "working-set", "gc-heap-size"]
    assert {"alloc-rate", "exception-count", "gen-2-gc-count", "loh-size", "threadpool-completed-items-count",
            "monitor-lock-contention-count", "threadpool-queue-length", "threadpool-thread-count"} <= set(names)
    alloc = next(e.values for e in evs if e.values["Name"] == "alloc-rate")
    assert alloc["CounterType"] == "Sum" and alloc["Increment"] == 146568.0 and alloc["DisplayUnits"] == "B"


def test_counters_follow_the_node_agent() -> None:
    evs, _, _ = events_of(DATA.read_bytes())
    c = dotnet.Counters()
    for e in evs:
        c.add(e.values)
    allocs = [e.values["Increment"] for e in evs if e.values["Name"] == "alloc-rate"]
    assert c.sums["alloc"] == sum(allocs)  # increments add up
    assert c.gauges["LOH"] == 5056824.0  # the last value
    assert "Gen0" in c.sums and "threads" in c.gauges
    c.add({"Name": "gc-heap-size", "CounterType": "Mean", "Mean": 7.0, "DisplayUnits": "MB"})  # not exported
    c.add({"Name": "gen-0-size", "CounterType": "Mean", "Mean": 2.0, "DisplayUnits": "MB"})
    assert c.gauges["Gen0"] == 2e6
    c.add({"Name": "exception-count", "CounterType": "Sum", "Increment": float("nan")})
    c.add({"Name": "exception-count", "CounterType": "Sum", "Increment": 3.0})
    c.add({"Name": "exception-count", "CounterType": "Sum", "Increment": 4.0})
    assert c.sums["exceptions"] == 7.0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_garbage_raises_only_invalid(data: bytes) -> None:
    events_of(data)  # events_of catches Invalid only: anything else fails the test


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=16192), st.binary(min_size=1, max_size=64))
def test_corrupted_recording_raises_only_invalid(at: int, junk: bytes) -> None:
    data = DATA.read_bytes()
    events_of(data[:at] + junk + data[at + len(junk):])


def test_bounds() -> None:
    data = bytearray(DATA.read_bytes())
    evs, _, _ = events_of(bytes(data))
    head = b"Nettrace" + struct.pack("<i", 20) + nettrace.SERIALIZATION
    assert data.startswith(head)
    # a block that claims more than MAX_BLOCK
    trace_end = len(head) + 21 + 48 + 1  # the Trace object: its opening and type, 48 bytes, its end
    assert data[trace_end - 1] == nettrace.TAG_END and data[trace_end] == nettrace.TAG_BEGIN
    blk = bytes(data[:trace_end]) + b"\x05\x05\x01" + bytes(8) + struct.pack("<i", 10) + b"EventBlock\x06" \
        + struct.pack("<i", nettrace.MAX_BLOCK + 1)
    _, _, err = events_of(blk)
    assert "block of" in err
    assert len(evs) == 95


def test_ipc_messages() -> None:
    m = dotnet.message(dotnet.EVENTPIPE, dotnet.COLLECT_TRACING, b"xy")
    assert m[:14] == b"DOTNET_IPC_V1\0" and struct.unpack_from("<HBBH", m, 14) == (22, 2, 2, 0)
    p = dotnet.collect_tracing_payload(5)
    assert p[:12] == struct.pack("<III", 10, 1, 1)
    assert "System.Runtime\0".encode("utf-16-le") in p and "EventCounterIntervalSec=5\0".encode("utf-16-le") in p
    with pytest.raises(dotnet.IpcError):
        dotnet.parse_header(b"x" * 20)


def test_detection() -> None:
    maps = (b"7f00-7f01 r-xp 0 08:01 1 /usr/lib/x/shared/Microsoft.NETCore.App/3.1.23/libcoreclr.so\n"
            b"7f02-7f03 r-xp 0 08:01 2 /usr/lib/libc.so.6\n")
    path = dotnet.coreclr_path(maps)
    assert path == "/usr/lib/x/shared/Microsoft.NETCore.App/3.1.23/libcoreclr.so"
    assert dotnet.version_from_path(path) == "3.1.23"
    assert dotnet.coreclr_path(b"7f02-7f03 r-xp 0 08:01 2 /usr/lib/libcoreclrx.so\n") is None
    assert dotnet.app_name(b"/usr/bin/dotnet\0/app/Accounting.dll\0", "/usr/share/dotnet/dotnet") == "Accounting"
    assert dotnet.app_name(b"./Api\0", "/app/Api") == "Api"
    assert dotnet.tmpdir(b"A=1\0TMPDIR=/var/tmp/\0") == "/var/tmp"
    assert dotnet.tmpdir(b"TMPDIR=rel\0") == "/tmp"


def test_a_socket_that_is_not_the_process_is_refused(tmp_path: Path) -> None:
    """A diagnostics socket served by another process than the one followed (here: this
    process's own listener, followed as if it were pid 1) is refused by SO_PEERCRED."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    (root / "tmp").mkdir()
    procfs = tmp_path / "proc"
    (procfs / "1").mkdir(parents=True)
    (procfs / "1" / "status").write_text("NSpid:\t77\n")
    os.symlink(root, procfs / "1" / "root")
    srv = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(root / "tmp")  # a short path: sun_path has 108 bytes
    try:
        srv.bind("dotnet-diagnostic-77-123-socket")
    finally:
        os.chdir(cwd)
    srv.listen(1)
    try:
        with pytest.raises(dotnet.IpcError, match="served by pid"):
            dotnet.connect(str(procfs), 1, "/tmp")
    finally:
        srv.close()


def test_a_server_that_never_answers_times_out() -> None:
    a, b = socket.socketpair()
    a.settimeout(0.2)
    try:
        with pytest.raises(dotnet.IpcError, match="in time"):
            dotnet.request(a, dotnet.EVENTPIPE, dotnet.COLLECT_TRACING, b"")
    finally:
        a.close()
        b.close()


def test_an_error_answer_and_garbage_answers() -> None:
    for answer, match in ((dotnet.HEADER.pack(dotnet.MAGIC, 24, 0xFF, 0xFF, 0) + struct.pack("<I", 0x80131385),
                           "error answer"), (b"garbage garbage garbage!", "not a diagnostics"),
                          (dotnet.HEADER.pack(dotnet.MAGIC, 60000, 0xFF, 0, 0), "answer of")):
        a, b = socket.socketpair()
        a.settimeout(1)
        t = threading.Thread(target=lambda b=b, answer=answer: (b.recv(100), b.sendall(answer)))
        t.start()
        try:
            with pytest.raises(dotnet.IpcError, match=match):
                dotnet.request(a, 4, 4, b"", limit=1000)
        finally:
            t.join()
            a.close()
            b.close()
