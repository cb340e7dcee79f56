"""`coroot-agent check`: the preflight table. Each row says what was found and, when it fails,
what to do. The agent can run only when no row fails.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass

from agent import caps as caps_mod
from agent.config import Config
from agent.containers.cgroup import detect_layout
from agent.containers.runtimes import ABSENT, DISABLED, REACHABLE
from agent.containers.runtimes.resolver import runtime_resolver
from agent.ebpf import headers as headers_mod
from agent.ebpf import loader, tracefs

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "FAIL"

@dataclass(frozen=True)
class Row:
    name: str
    status: str
    detail: str
    fix: str = ""


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

    caps = caps_mod.held()
    bpf_ok = caps_mod.LEGACY_BPF in caps or {"CAP_BPF", "CAP_PERFMON"} <= caps
    shown = "all" if caps >= set(caps_mod.NUMBERS) else ", ".join(sorted(caps)) or "none"
    rows.append(Row("capabilities", OK if bpf_ok else FAIL, f"held: {shown}",
                    "" if bpf_ok else "run as root, or grant CAP_BPF and CAP_PERFMON (kernel 5.8+) or CAP_SYS_ADMIN"))
    for cap, lost in caps_mod.lost_features(caps):
        if cap in ("CAP_BPF", "CAP_PERFMON"):
            continue  # the row above and the probe rows say it
        rows.append(Row(f"  {cap}", WARN, f"missing: {lost}", f"grant {cap} (see deploy/kubernetes/)"))

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
    rows += runtime_rows(cfg)

    ready = have_bcc and hdr.found and mounts.ok and bpf_ok
    enabled = set(cfg.probe_families)
    for name, fam in loader.FAMILIES.items():
        if name not in enabled:
            rows.append(Row(f"probes: {name}", OK, "off in this configuration: not loaded"))
            continue
        can, missing = caps_mod.can_load(caps, name)
        if not can:
            rows.append(Row(f"probes: {name}", FAIL, f"cannot load without {', '.join(missing)}",
                            f"grant {', '.join(missing)} (kernel 5.8+), or CAP_SYS_ADMIN on older kernels"))
            continue
        if not probe or not ready:
            rows.append(Row(f"probes: {name}", FAIL if probe else WARN, "not tried: fix the rows above first"
                            if probe else "not tried (--no-probe)"))
            continue
        try:
            loaded = loader.load([name], {}, hdr)
            detail = f"{fam.purpose}: {len(loaded.tracepoints)} tracepoints, compiled in {loaded.compile_seconds:.1f}s"
            if fam.requires:
                detail += f" (with {', '.join(fam.requires)})"
            status, fix = OK, ""
            tls: list[Row] = []
            if name == "l7":
                uprobes, ok = _uprobe_check(loaded)
                detail += f"; {uprobes}"
                if not ok:
                    status, fix = WARN, ("TLS needs uprobes: CAP_SYS_ADMIN, or a writable /sys/kernel/debug/tracing "
                                         "(BCC defines them in uprobe_events then)")
                tls = tls_rows(loaded, cfg.procfs_root)
            loaded.close()
            rows.append(Row(f"probes: {name}", status, detail, fix))
            rows += tls
        except loader.LoadError as e:
            rows.append(Row(f"probes: {name}", FAIL, str(e).splitlines()[0][:300],
                            "see the BCC error above; `coroot-agent run --log-level debug` shows all of it"))
    return rows


def _uprobe_check(loaded: loader.Loaded) -> tuple[str, bool]:
    """Attach the OpenSSL uprobes to the system's libssl, mapped into this process for the test."""
    import ctypes
    import ctypes.util
    import tempfile

    from agent.l7.tls import TlsAttacher

    lib = ctypes.util.find_library("ssl")
    if not lib:
        return "no libssl on this system to try uprobes on", True
    try:
        ctypes.CDLL(lib)
    except OSError as e:
        return f"cannot load {lib}: {e}", True
    with tempfile.TemporaryDirectory() as links:
        tls = TlsAttacher(loaded, link_dir=links)
        tls.scan_pid(os.getpid())
        probes = sum(found.probes for found in tls.libraries.values())
    if probes:
        return f"{probes} OpenSSL uprobes attach to {lib}", True
    return f"OpenSSL uprobes do not attach to {lib}", False


TLS_ROWS = 40  # processes listed one by one; the rest are counted


def tls_rows(loaded: loader.Loaded, procfs: str = "/proc") -> list[Row]:
    """Per process, the TLS libraries the agent finds in it and whether their probes attach (or
    why not): every process is looked at as the agent would, and the probes go with `loaded`."""
    import tempfile

    from agent.l7.tls import TlsAttacher

    pids = sorted(int(d) for d in os.listdir(procfs) if d.isdigit())
    rows: list[Row] = []
    users = traced = 0
    with tempfile.TemporaryDirectory() as links:
        tls = TlsAttacher(loaded, procfs=procfs, link_dir=links)
        for pid in pids:
            tls.scan_pid(pid)
            found = tls.describe(pid)
            if not found:
                continue
            users += 1
            ok = all(f["attached"] for f in found)
            traced += ok
            if len(rows) < TLS_ROWS:
                try:
                    with open(f"{procfs}/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                detail = "; ".join(f"{f['library']} {f['path']}: {f['detail']}" for f in found)
                rows.append(Row(f"  tls: {pid} {comm}", OK if ok else WARN, detail,
                                "" if ok else "see the reason; `coroot-agent run` logs it too"))
    more = users - len(rows)
    summary = Row("  tls: processes", OK, f"{len(pids)} looked at, {users} use TLS libraries the agent knows, "
                  f"{traced} of them fully traced" + (f" ({more} not listed)" if more else ""))
    return [summary, *rows]


def _listen_row(cfg: Config) -> Row:
    host, port = cfg.listen_address
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return Row("listen", OK, f"{host}:{port} is free")
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            pid = own_agent_on(cfg, host, port)
            if pid is not None:
                return Row("listen", OK, f"{host}:{port} is held by the running coroot-agent, pid {pid}")
            why = "in use by another process"
        else:
            why = e.strerror or str(e)
        return Row("listen", FAIL, f"{host}:{port}: {why}", "choose another address with --listen")
    finally:
        s.close()


def _norm_listen(value: object) -> tuple[str, int] | None:
    """"host:port" or "[v6]:port" as the agent writes it in its lock file; None when garbage."""
    if not isinstance(value, str):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _is_agent_process(pid: int, procfs: str = "/proc") -> bool:
    """Alive, and its command line is coroot-agent's (the entry point or `python -m agent`)."""
    try:
        with open(os.path.join(procfs, str(pid), "cmdline"), "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read(4096).split(b"\0") if a]
    except OSError:
        return False
    if not argv:
        return False
    if any(os.path.basename(a) == "coroot-agent" for a in argv[:2]):
        return True
    return any(argv[i] == "-m" and argv[i + 1] == "agent" for i in range(min(len(argv) - 1, 3)))


def own_agent_on(cfg: Config, host: str, port: int, procfs: str = "/proc") -> int | None:
    """The pid of the coroot-agent that holds the store lock in storage.path and says it listens
    on host:port, when that process is alive and is coroot-agent; else None."""
    from agent.query import StoreLock  # the store's module; imported only when the port is taken

    try:
        info = StoreLock.for_config(cfg).holder()
    except OSError:
        return None
    if not isinstance(info, dict):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return None
    if _norm_listen(info.get("listen")) != (host.strip("[]"), port):
        return None
    return pid if _is_agent_process(pid, procfs) else None


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


RUNTIME_CHECK_TIMEOUT = 2.0  # seconds each runtime gets to answer `check`


def runtime_rows(cfg: Config) -> list[Row]:
    """One row per container runtime: reachable (its version), absent (no socket: most likely
    not on this node), unreachable (a socket nothing answers on) or disabled. None fails the
    check: without a runtime, containers keep the ids their cgroups give."""
    resolver = runtime_resolver(cfg, timeout=RUNTIME_CHECK_TIMEOUT)
    rows = []
    try:
        statuses = resolver.status()
    finally:
        resolver.close()
    for st in statuses:
        name = f"runtime: {st.runtime}"
        if st.state == REACHABLE:
            rows.append(Row(name, OK, f"{st.version or 'version unknown'} at {st.socket}"))
        elif st.state == ABSENT:
            rows.append(Row(name, OK, f"absent ({st.detail})"))
        elif st.state == DISABLED:
            rows.append(Row(name, OK, "disabled (--disable-runtime)"))
        else:
            rows.append(Row(name, WARN, f"unreachable at {st.socket}: {st.detail}",
                            f"is {st.runtime} running? its containers keep cgroup-derived ids until it answers; "
                            f"mount its socket (deploy/kubernetes) or set --{st.runtime}-socket"))
    return rows


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
