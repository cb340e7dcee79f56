"""Start-up, `check`, tracefs mounting and shutdown, on the real host."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from agent.ebpf import tracefs
from tests.system.helpers import AgentProcess, free_port


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "check", "--listen", f"127.0.0.1:{free_port()}", *args],
                          capture_output=True, text=True, timeout=120)


def test_check_passes_here_and_names_its_headers_source() -> None:
    r = run_check()
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^kernel headers\s+ok\s+(modules|kheaders|closest): /", r.stdout, re.M), r.stdout
    assert re.search(r"^probes: proc\s+ok\s+.*4 tracepoints", r.stdout, re.M), r.stdout
    assert r.stdout.rstrip().endswith("the agent can run")


def test_check_fails_and_says_why_when_the_listen_port_is_taken() -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "agent", "check", "--no-probe", "--listen", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"127.0.0.1:{port}: in use by another process" in r.stdout
    assert "fix: choose another address with --listen" in r.stdout


def _mounted(path: str, fstype: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [path, fstype] for line in f)


def test_check_mounts_tracefs_and_debugfs_when_missing() -> None:
    for path in (tracefs.TRACEFS, tracefs.DEBUGFS):
        while _mounted(path, "tracefs") or _mounted(path, "debugfs"):
            subprocess.run(["umount", "-l", path], check=True)
    assert not _mounted(tracefs.TRACEFS, "tracefs")
    r = run_check("--no-probe")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mounted now: /sys/kernel/debug, /sys/kernel/tracing" in r.stdout
    assert _mounted(tracefs.TRACEFS, "tracefs") and _mounted(tracefs.DEBUGFS, "debugfs")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_detaches_probes_and_exits_0_within_5s(sig: int) -> None:
    a = AgentProcess()
    a.start()
    t0 = time.monotonic()
    code = a.stop(sig, timeout=5)
    took = time.monotonic() - t0
    assert code == 0, a.log()
    assert took < 5
    assert "stopped" in a.log()


def test_agent_refuses_to_start_when_its_port_is_taken() -> None:
    a = AgentProcess()
    a.start()
    try:
        b = AgentProcess()
        b.args = ["--listen", f"127.0.0.1:{a.port}"]
        with pytest.raises(RuntimeError, match="agent exited with 1"):
            b.start(timeout=30)
        assert f"cannot start: cannot listen on 127.0.0.1:{a.port}: Address already in use; choose another --listen" in b.log()
    finally:
        a.stop()
