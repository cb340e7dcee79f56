"""`coroot-agent check`: the preflight table. Each row says what was found and, when it fails,
what to do. The agent can run only when no row fails.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass

from agent.config import Config
from agent.containers.cgroup import detect_layout
from agent.ebpf import headers as headers_mod
from agent.ebpf import loader, tracefs

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "FAIL"

# Capability numbers (linux/capability.h).
CAPS = {
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}


@dataclass(frozen=True)
class Row:
    name: str
    status: str
    detail: str
    fix: str = ""


def effective_caps(status_path: str = "/proc/self/status") -> set[str]:
    mask = 0
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
    return {name for name, bit in CAPS.items() if mask & (1 << bit)}


def run_checks(cfg: Config, probe: bool = True) -> list[Row]:
    rows: list[Row] = []
    release = os.uname().release
    ver = loader.kernel_version(release)
    if ver >= (4, 16):
        rows.append(Row("kernel", OK, f"{release}"))
    else:
        rows.append(Row("kernel", FAIL, f"{release}", "eBPF tracing needs Linux 4.16 or newer"))

    btf = "/sys/kernel/btf/vmlinux"
    rows.append(Row("BTF", OK if os.path.exists(btf) else WARN,
                    btf if os.path.exists(btf) else "no /sys/kernel/btf/vmlinux (not needed by BCC; fentry extras stay off)"))

    mounts = tracefs.ensure_mounted()
    if mounts.ok:
        detail = tracefs.tracefs_events_dir() or ""
        if mounts.mounted_now:
            detail += f" (mounted now: {', '.join(mounts.mounted_now)})"
        rows.append(Row("tracefs", OK, detail))
    else:
        rows.append(Row("tracefs", FAIL, mounts.error or "not mounted",
                        "mount -t tracefs none /sys/kernel/tracing (needs CAP_SYS_ADMIN), or mount the host's into the container"))

    hdr = headers_mod.resolve(release)
    if hdr.found:
        rows.append(Row("kernel headers", OK, f"{hdr.kind}: {hdr.detail}"))
    else:
        rows.append(Row("kernel headers", FAIL, hdr.detail,
                        "apt-get install linux-headers-$(dpkg --print-architecture), or mount the host's /lib/modules and /usr/src"))

    caps = effective_caps()
    bpf_ok = "CAP_SYS_ADMIN" in caps or {"CAP_BPF", "CAP_PERFMON"} <= caps
    rows.append(Row("capabilities", OK if bpf_ok else FAIL, ", ".join(sorted(caps)) or "none",
                    "" if bpf_ok else "run as root, or grant CAP_BPF and CAP_PERFMON (kernel 5.8+) or CAP_SYS_ADMIN"))

    layout = detect_layout(cfg.cgroupfs_root)
    rows.append(Row("cgroups", OK, f"{layout.mode} at {layout.root}"))

    if loader.ringbuf_supported(release):
        rows.append(Row("event buffer", OK, "ring buffer (5.8+)"))
    else:
        rows.append(Row("event buffer", OK, "perf buffer (kernel older than 5.8)"))

    try:
        import bcc  # noqa: F401
        rows.append(Row("bcc", OK, f"BCC python module {getattr(bcc, '__version__', '')}".strip()))
        have_bcc = True
    except ImportError as e:
        rows.append(Row("bcc", FAIL, str(e), "apt-get install python3-bpfcc and use a --system-site-packages virtualenv (make setup)"))
        have_bcc = False

    rows.append(_listen_row(cfg))
    rows.append(_store_row(cfg))

    ready = have_bcc and hdr.found and mounts.ok and bpf_ok
    for name, fam in loader.FAMILIES.items():
        if not probe or not ready:
            rows.append(Row(f"probes: {name}", FAIL if probe else WARN, "not tried: fix the rows above first"
                            if probe else "not tried (--no-probe)"))
            continue
        try:
            loaded = loader.load([name], {}, hdr)
            detail = f"{fam.purpose}: {len(loaded.tracepoints)} tracepoints, compiled in {loaded.compile_seconds:.1f}s"
            if fam.requires:
                detail += f" (with {', '.join(fam.requires)})"
            loaded.close()
            rows.append(Row(f"probes: {name}", OK, detail))
        except loader.LoadError as e:
            rows.append(Row(f"probes: {name}", FAIL, str(e).splitlines()[0][:300],
                            "see the BCC error above; `coroot-agent run --log-level debug` shows all of it"))
    return rows


def _listen_row(cfg: Config) -> Row:
    host, port = cfg.listen_address
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return Row("listen", OK, f"{host}:{port} is free")
    except OSError as e:
        why = "in use (is an agent already running?)" if e.errno == errno.EADDRINUSE else e.strerror
        return Row("listen", FAIL, f"{host}:{port}: {why}", "choose another address with --listen")
    finally:
        s.close()


def _store_row(cfg: Config) -> Row:
    from agent.query import StoreLock
    from agent.sinks.store import Store, StoreError

    try:
        store = Store(cfg)
    except StoreError as e:
        return Row("store", FAIL, str(e), "point global_clickhouse.address at the HTTP(S) port")
    if store.embedded:
        holder = StoreLock.for_config(cfg).holder()
        if holder is not None:
            return Row("store", OK, f"{store.describe()} (held by the running agent, pid {holder.get('pid')})")
        parent = cfg.storage_path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            return Row("store", FAIL, f"{cfg.storage_path} is not writable",
                       "choose a writable --storage-path")
        return Row("store", OK, store.describe())
    try:
        store.open()
        store.ping()
        return Row("store", OK, f"{store.describe()} answers")
    except StoreError as e:
        return Row("store", FAIL, str(e), "the message names the setting to fix")
    finally:
        store.close()


def render(rows: list[Row]) -> str:
    w = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"{r.name:<{w}}  {r.status:<4}  {r.detail}")
        if r.fix and r.status != OK:
            lines.append(f"{'':<{w}}        fix: {r.fix}")
    failed = [r.name for r in rows if r.status == FAIL]
    lines.append("")
    lines.append("the agent can run" if not failed else f"the agent cannot run: {', '.join(failed)}")
    return "\n".join(lines)
