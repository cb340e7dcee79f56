"""Linux capabilities: which ones the agent needs and why, which it holds, and dropping the rest
once the probes are attached.

One source of truth: `REQUIRED` is what `coroot-agent check` reports, what the agent keeps,
and what deploy/kubernetes/ grants (a unit test compares the manifests with it). On kernels
older than 5.8 CAP_BPF and CAP_PERFMON do not exist and CAP_SYS_ADMIN stands in for both (the
privileged DaemonSet variant).

Capabilities are per thread: `drop_to` changes the calling thread's sets, and threads started
afterwards inherit them — so the agent drops before it starts any thread of its own.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

# linux/capability.h
NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}


@dataclass(frozen=True)
class Need:
    cap: str
    why: str
    lost: str  # what the agent cannot do without it
    families: tuple[str, ...] = ()  # probe families that cannot load without it
    after_start: bool = True  # still needed once the probes are attached
    before_kernel: tuple[int, int] | None = None  # needed only on kernels older than this


REQUIRED: tuple[Need, ...] = (
    Need("CAP_BPF", "load BPF programs, create maps, and read them (bpf())",
         "every probe family: the agent cannot run", ("proc", "tcp", "l7", "logs", "profiler", "python", "nodejs")),
    Need("CAP_PERFMON", "attach tracepoints, uprobes and the CPU sampling perf event (perf_event_open), and "
         "read user memory from BPF programs", "every probe family: the agent cannot run",
         ("proc", "tcp", "l7", "logs", "profiler", "python", "nodejs")),
    Need("CAP_SYS_PTRACE", "reach /proc/PID/{root,exe,ns,fd} of processes with more privileges than the agent: "
         "the libssl files inside their filesystems to put uprobes on, their binaries to symbolize, their "
         "network namespace, their open sockets and log files",
         "for processes with more privileges than the agent: TLS uprobes on libraries in their filesystems, "
         "profile symbols of their binaries, TCP seeding, NAT resolution and log discovery"),
    Need("CAP_DAC_READ_SEARCH", "read files their permissions close to the agent: container log files, "
         "binaries for symbols, /var/lib paths of other users",
         "log files and binaries not readable by the agent's user"),
    Need("CAP_SYSLOG", "kernel symbol addresses in /proc/kallsyms when kernel.kptr_restrict=1",
         "kernel frames in CPU profiles show as [unknown] when kernel.kptr_restrict=1"),
    Need("CAP_SYS_RESOURCE", "raise RLIMIT_MEMLOCK for BPF maps (kernels before 5.11 charge maps to it)",
         "BPF maps larger than the memlock limit", after_start=False, before_kernel=(5, 11)),
)
REQUIRED_NAMES: tuple[str, ...] = tuple(n.cap for n in REQUIRED)
# Kept when granted, never asked for: the kernel answers every taskstats request
# (TASKSTATS_CMD_GET, per process as well as the registration for exits) only to a sender
# holding CAP_NET_ADMIN (GENL_ADMIN_PERM, checked for the socket's opener and for the sender),
# and that capability also lets a process reconfigure the host's network. The least-privilege
# DaemonSet leaves it out; granting it adds the delay metrics.
OPTIONAL: tuple[Need, ...] = (
    Need("CAP_NET_ADMIN", "read per-process CPU and block I/O delays over taskstats netlink",
         "container_resources_cpu_delay_seconds_total and container_resources_disk_delay_seconds_total"),
)
# On kernels before 5.8 this one capability covers CAP_BPF and CAP_PERFMON.
LEGACY_BPF = "CAP_SYS_ADMIN"


def _mask(names: set[str] | frozenset[str]) -> int:
    m = 0
    for n in names:
        m |= 1 << NUMBERS[n]
    return m


def names_of(mask: int) -> set[str]:
    return {n for n, b in NUMBERS.items() if mask & (1 << b)}


def held(kind: str = "CapEff", status_path: str = "/proc/self/status") -> set[str]:
    """Capabilities in the given set of this process (CapEff, CapPrm, CapBnd, CapAmb)."""
    with open(status_path) as f:
        for line in f:
            if line.startswith(kind + ":"):
                return names_of(int(line.split()[1], 16))
    return set()


def can_load(have: set[str], family: str) -> tuple[bool, list[str]]:
    """Whether a probe family can load with `have`, and the capabilities it misses."""
    if LEGACY_BPF in have:
        need = {n.cap for n in REQUIRED if family in n.families} - {"CAP_BPF", "CAP_PERFMON"}
    else:
        need = {n.cap for n in REQUIRED if family in n.families}
    missing = sorted(need - have)
    return not missing, missing


def lost_features(have: set[str], kernel: tuple[int, int] | None = None) -> list[tuple[str, str]]:
    """(capability, what is lost) for each required capability not held that this kernel needs."""
    if kernel is None:
        from agent.ebpf.loader import kernel_version

        kernel = kernel_version()
    out = []
    for n in REQUIRED:
        if n.cap in have or (n.cap in ("CAP_BPF", "CAP_PERFMON") and LEGACY_BPF in have):
            continue
        if n.before_kernel is not None and kernel >= n.before_kernel:
            continue
        out.append((n.cap, n.lost))
    return out


# --------------------------------------------------------------------------- dropping ---

_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def keep_after_start(kernel: tuple[int, int] | None = None) -> set[str]:
    """What the agent keeps once attached (OPTIONAL ones only if held: `drop_to` never adds).
    Before 5.8 reading the maps needs CAP_SYS_ADMIN."""
    keep = {n.cap for n in REQUIRED if n.after_start} | {n.cap for n in OPTIONAL if n.after_start}
    if kernel is None:
        from agent.ebpf.loader import kernel_version

        kernel = kernel_version()
    if kernel < (5, 8):
        keep.add(LEGACY_BPF)
    return keep


def drop_to(keep: set[str]) -> list[str]:
    """Keep only `keep` (of what is held) in this thread's effective and permitted sets, clear
    the inheritable and ambient sets, shrink the bounding set when allowed, and set
    no_new_privs. Returns what was dropped. Raises OSError when the kernel refuses."""
    libc = _libc()
    header = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    permitted = data[0].permitted | (data[1].permitted << 32)
    new = permitted & _mask(frozenset(keep))
    dropped = sorted(names_of(permitted & ~new))
    if "CAP_SETPCAP" in names_of(data[0].effective | (data[1].effective << 32)):
        for name, bit in NUMBERS.items():
            if name not in keep:
                libc.prctl(PR_CAPBSET_DROP, bit, 0, 0, 0)  # fails harmlessly for unknown bits
    for i in range(2):
        part = (new >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = part
        data[i].permitted = part
        data[i].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    return dropped


def no_new_privs(status_path: str = "/proc/self/status") -> bool:
    with open(status_path) as f:
        for line in f:
            if line.startswith("NoNewPrivs:"):
                return line.split()[1] == "1"
    return False
