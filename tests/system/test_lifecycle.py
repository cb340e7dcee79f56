"""Start-up, `check`, tracefs mounting and shutdown, on the real host: stopped by a signal, the
agent exits within 2 s, under load too, with everything it had produced in the store."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.ebpf import tracefs
from tests.system.helpers import (
    L7_CLIENT,
    REPO,
    AgentFactory,
    LogWriter,
    TestCgroups,
    coroot_agent,
    cpu_burners,
    free_port,
    log_counts,
    releasers_of,
    rows,
    run_client,
    wait_for,
)
from tests.system.servers import Nginx

# Seconds from the signal to the process's exit: issue 14's 2 s, under load (two CPU burners,
# nginx and log traffic, ~780 rows to flush). The probes' detach, ~1.6-2 s in the kernel (RCU
# grace periods under the trace event lock, one probe after the other), is left to a process the
# agent hands them to (agent/ebpf/release.py); the stop measured 0.2-0.8 s with it, 2.1-2.6 s
# without. bench/stop.py prints the figures.
STOP_DEADLINE = 2.0


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return coroot_agent("check", "--listen", f"127.0.0.1:{free_port()}", *args)


def test_check_passes_here_and_names_its_headers_source() -> None:
    r = run_check()
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^kernel headers\s+ok\s+(modules|kheaders|closest): /", r.stdout, re.M), r.stdout
    assert re.search(r"^probes: proc\s+ok\s+.*4 tracepoints", r.stdout, re.M), r.stdout
    assert r.stdout.rstrip().endswith("the agent can run")


def test_check_fails_and_says_why_when_the_listen_port_is_taken() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = coroot_agent("check", "--no-probe", "--listen", f"127.0.0.1:{port}", timeout=60)
    assert r.returncode == 1
    assert f"127.0.0.1:{port}: in use by another process" in r.stdout
    assert "fix: choose another address with --listen" in r.stdout


# Run in a mount namespace of its own: tracefs and debugfs are unmounted there, not on the
# host, where every other agent (other tests, other runs on this machine) compiles against them.
UNMOUNTED_CHECK = """
import json, subprocess, sys
from agent.ebpf import tracefs

def mounted(path, fstype):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [path, fstype] for line in f)

for path in (tracefs.TRACEFS, tracefs.DEBUGFS):
    while mounted(path, "tracefs") or mounted(path, "debugfs"):
        subprocess.run(["umount", "-l", path], check=True)
before = mounted(tracefs.TRACEFS, "tracefs")
r = subprocess.run([sys.executable, "-m", "agent", *sys.argv[1:]], capture_output=True, text=True, timeout=120)
print(json.dumps({"before": before, "code": r.returncode, "out": r.stdout + r.stderr,
                  "after": [mounted(tracefs.TRACEFS, "tracefs"), mounted(tracefs.DEBUGFS, "debugfs")]}))
"""


def test_check_mounts_tracefs_and_debugfs_when_missing() -> None:
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", UNMOUNTED_CHECK,
                        "check", "--no-probe", "--listen", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["before"] is False
    assert got["code"] == 0, got["out"]
    assert "mounted now: /sys/kernel/debug, /sys/kernel/tracing" in got["out"]
    assert got["after"] == [True, True]


def stop_and_time(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[int, float]:
    """Signal, wait for the exit (up to 30 s, so a slow stop is measured, not cut short):
    (exit code, seconds from the signal to the exit)."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(30)
    return code, time.monotonic() - t0


def programs_of(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds a descriptor of (its fdinfo's prog_id)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-prog":
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    out |= {int(line.split()[1]) for line in f if line.startswith("prog_id:")}
        except OSError:
            continue
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_detaches_probes_and_exits_0_within_2s(agent_factory: AgentFactory, sig: int) -> None:
    """The agent exits, then every probe of its goes (the process it hands them to detaches
    them): its programs, which only its probes held then, are freed, and no uprobe definition
    of its is left in uprobe_events."""
    a = agent_factory(defaults=False)
    assert a.proc is not None
    pid = a.proc.pid
    programs = programs_of(pid)
    assert len(programs) >= 20, programs
    code, took = stop_and_time(a.proc, sig)
    assert code == 0, a.log()
    assert took <= STOP_DEADLINE, f"stopped in {took:.2f} s; the log's end:\n" + "\n".join(a.log().splitlines()[-12:])
    assert "stopped" in a.log() and "handed to a process that detaches them" in a.log()
    assert wait_for(lambda: not releasers_of(pid), 30)
    left = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                     check=True).stdout or "[]")
    assert not programs & {p["id"] for p in left}, sorted(programs & {p["id"] for p in left})
    events = tracefs.tracefs_events_dir()
    assert events is not None
    defined = Path(os.path.dirname(events), "uprobe_events").read_text()
    assert f"_bcc_{pid} " not in defined and not defined.rstrip().endswith(f"_bcc_{pid}"), defined


BACKGROUND_LOG = """
import sys, time
with open(sys.argv[1], "a", buffering=1) as f:
    i = 0
    while True:
        f.write(f"INFO background line {i} of the stop test\\n")
        i += 1
        time.sleep(0.005)
"""


def test_sigterm_under_load_exits_within_2s_with_what_it_had_in_the_store(
        agent_factory: AgentFactory, cgroups: TestCgroups, tmp_path: Path) -> None:
    """HTTP and log traffic, both cores busy with two CPU burners; the store written only at
    the stop (batches of up to 100000 rows or 60 s): SIGTERM right after the agent has handled
    the last 300 log lines and 40 spans; it exits 0 within 2 s and they are all in the store."""
    a = agent_factory("--min-container-age", "0s", "--store-batch-age", "60s", "--store-batch-rows", "100000",
                      defaults=False)
    assert a.proc is not None
    tag = uuid.uuid4().hex[:8]
    logs = [f"/var/log/ca-stop-{tag}-{name}.log" for name in ("bg", "marker")]
    nginx = Nginx()
    try:
        nginx.start(cgroups, cgroups.create("stop-nginx"))
        # Background traffic: a keep-alive HTTP client (traces off: the spans counted below are
        # the marker's alone) and a log line every 5 ms.
        cgroups.spawn(cgroups.create("stop-bg-http"),
                      [*L7_CLIENT, "http", "127.0.0.1", str(nginx.port), "/background:10000000"],
                      env=os.environ | {"COROOT_EBPF_TRACES": "disabled"},
                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO)
        bg_log = cgroups.create("stop-bg-log")
        cgroups.spawn(bg_log, [sys.executable, "-c", BACKGROUND_LOG, logs[0]])
        with cpu_burners(2):
            assert wait_for(lambda: sum(log_counts(a, bg_log).values()) > 200, 30), "no background traffic seen"
            spans_before = a.value("coroot_agent_l7_spans_total") or 0
            # The marker: what the agent handles last before the signal.
            marker_log, marker_http = cgroups.create("stop-marker-log"), cgroups.create("stop-marker-http")
            w = LogWriter(cgroups, marker_log)
            w(f"open {logs[1]}")
            w(f"lines 300 ERROR stop marker {tag} line {{i}}")
            client = run_client(cgroups, marker_http, "http", "127.0.0.1", str(nginx.port), "/stop-marker:40")
            assert client.result["statuses"] == {"200": 40}
            handled = wait_for(lambda: sum(log_counts(a, marker_log).values()) == 300
                               and a.value("coroot_agent_l7_spans_total") == spans_before + 40, 30)
            assert handled, (log_counts(a, marker_log), a.value("coroot_agent_l7_spans_total"), spans_before,
                             {n: v for n, lb, v in a.metrics() if n == "coroot_agent_lost_events_total" and v})
            pending = a.value("coroot_agent_store_pending_rows")
            code, took = stop_and_time(a.proc)
        client.finish()
        w.close()
    finally:
        nginx.stop()
        for path in logs:
            Path(path).unlink(missing_ok=True)
    stored_logs = rows(a, f"SELECT count() AS n FROM otel_logs WHERE ResourceAttributes['container.id'] = '{marker_log}'")
    stored_spans = rows(a, f"SELECT count() AS n FROM otel_traces WHERE ServiceName = '{marker_http}'")
    print(f"stop under load: {took:.2f} s, {pending:.0f} rows pending at the signal", file=sys.stderr)
    assert code == 0, a.log()[-3000:]
    assert (stored_logs, stored_spans) == ([{"n": 300}], [{"n": 40}]), "not flushed at the stop"
    assert pending and pending >= 340  # the marker was still in memory: the stop wrote it
    assert took <= STOP_DEADLINE, (f"stopped in {took:.2f} s under load ({pending:.0f} rows pending); the log's "
                                   "end:\n" + "\n".join(a.log().splitlines()[-12:]))


def test_agent_refuses_to_start_when_its_port_is_taken(agent_factory: AgentFactory) -> None:
    a = agent_factory(defaults=False)
    b = agent_factory(defaults=False, start=False)
    b.args = ["--listen", f"127.0.0.1:{a.port}", "--storage-path", b.storage, "--wal-dir", f"{b.storage}/wal"]
    with pytest.raises(RuntimeError, match="agent exited with 1"):
        b.start(timeout=30)
    assert f"cannot start: cannot listen on 127.0.0.1:{a.port}: Address already in use; choose another --listen" in b.log()
