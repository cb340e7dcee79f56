"""Per-container CPU and block I/O delays from the kernel's delay accounting (taskstats over
generic netlink), as the Coroot node agent reports them:

- container_resources_cpu_delay_seconds_total: time the container's processes were runnable
  but waiting for a CPU;
- container_resources_disk_delay_seconds_total: time they waited for synchronous block I/O.

Each process is asked for its thread group's totals (TASKSTATS_CMD_ATTR_TGID: live threads plus
the threads that already exited); a container's counter grows by each process's increase since
the previous reading, so a process that exits takes nothing away from it. Since 5.14 the
kernel records block I/O delay only with `kernel.task_delayacct=1` (or the `delayacct` boot
parameter); without it the disk counter stays at 0 (CPU delay was still reported on 6.18,
older kernels may give 0 for it too). The node agent does not switch it on either.

The kernel answers TASKSTATS_CMD_GET only to a sender that holds CAP_NET_ADMIN at the time of
the request (the socket's opener must have held it too), so the agent keeps it after start.
Process ids are looked up in the caller's pid namespace: the agent runs in the host's.
Readings are taken on the poll thread (`tick`); a scrape only reads the sums.

The client is a small generic-netlink client on a raw socket: it asks for the thread-group
totals, which pyroute2's TaskStats does not, and reads the delay fields at their fixed offsets
in struct taskstats, which have not moved since its first version.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.component import Component
from agent.containers.registry import Registry
from agent.metrics import Families

if TYPE_CHECKING:
    from agent.ebpf.maps import Programs

log = logging.getLogger(__name__)

NETLINK_GENERIC = 16
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST = 1
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
NLA_F_NESTED = 1 << 15

# linux/taskstats.h
TASKSTATS_CMD_GET = 1
TASKSTATS_CMD_ATTR_PID, TASKSTATS_CMD_ATTR_TGID = 1, 2
TASKSTATS_TYPE_PID, TASKSTATS_TYPE_TGID, TASKSTATS_TYPE_STATS = 1, 2, 3
TASKSTATS_TYPE_AGGR_PID, TASKSTATS_TYPE_AGGR_TGID = 4, 5
# struct taskstats: u16 version; ... u64 cpu_count @16, cpu_delay_total @24, blkio_count @32,
# blkio_delay_total @40 (nanoseconds).
_STATS_HEAD = struct.Struct("=H22xQ8xQ")
_NLMSG = struct.Struct("=IHHII")
_GENL = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


@dataclass(frozen=True)
class Delays:
    """A thread group's accumulated delays, in nanoseconds."""

    cpu_ns: int
    blkio_ns: int


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLA.pack(_NLA.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Netlink attributes (type -> payload); the nested flag is dropped from the type; a
    truncated attribute ends the list."""
    out: dict[int, bytes] = {}
    off = 0
    while off + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, off)
        if length < _NLA.size or off + length > len(data):
            break
        out[kind & ~NLA_F_NESTED] = data[off + _NLA.size : off + length]
        off += _align(length)
    return out


def parse_stats(payload: bytes) -> Delays | None:
    """The delays in a struct taskstats; None when it is too short to hold them."""
    if len(payload) < _STATS_HEAD.size:
        return None
    _version, cpu, blkio = _STATS_HEAD.unpack_from(payload)
    return Delays(cpu, blkio)


class TaskstatsError(OSError):
    pass


class TaskstatsClient:
    """TASKSTATS_CMD_GET over a generic netlink socket. Not thread-safe: one caller at a time."""

    def __init__(self, timeout: float = 1.0) -> None:
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._family = 0
        self._seq = 0

    def open(self) -> None:
        """Opens the socket and resolves the TASKSTATS family; raises OSError when the kernel
        has no taskstats (CONFIG_TASKSTATS) or it is not reachable from this namespace."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            sock.settimeout(self._timeout)
            sock.bind((0, 0))
            self._sock = sock
            reply = self._request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                                  _attr(CTRL_ATTR_FAMILY_NAME, b"TASKSTATS\0"))
            fid = parse_attrs(reply).get(CTRL_ATTR_FAMILY_ID)
            if fid is None or len(fid) < 2:
                raise TaskstatsError(errno.ENOENT, "the TASKSTATS netlink family has no id")
            self._family = struct.unpack_from("=H", fid)[0]
        except BaseException:
            sock.close()
            self._sock = None
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def tgid(self, pid: int) -> Delays | None:
        """The thread group's delays; None when the process is gone. Raises OSError for any
        other refusal (EPERM without CAP_NET_ADMIN)."""
        try:
            reply = self._request(self._family, TASKSTATS_CMD_GET,
                                  _attr(TASKSTATS_CMD_ATTR_TGID, struct.pack("=I", pid)))
        except OSError as e:
            if e.errno == errno.ESRCH:
                return None
            raise
        attrs = parse_attrs(reply)
        nest = attrs.get(TASKSTATS_TYPE_AGGR_TGID) or attrs.get(TASKSTATS_TYPE_AGGR_PID)
        if nest is None:
            return None
        stats = parse_stats(parse_attrs(nest).get(TASKSTATS_TYPE_STATS, b""))
        return stats

    def _request(self, family: int, cmd: int, attrs: bytes) -> bytes:
        """Send one request; returns the attributes of its answer (after the genl header)."""
        sock = self._sock
        if sock is None:
            raise TaskstatsError(errno.EBADF, "taskstats client is not open")
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        body = _GENL.pack(cmd, 1, 0) + attrs
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), family, NLM_F_REQUEST, seq, 0) + body)
        while True:
            data = sock.recv(65536)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind, _flags, mseq, _port = _NLMSG.unpack_from(data, off)
                if length < _NLMSG.size or off + length > len(data):
                    break
                msg = data[off + _NLMSG.size : off + length]
                off += _align(length)
                if mseq != seq:
                    continue  # the answer to an earlier request that timed out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", msg)[0] if len(msg) >= 4 else errno.EIO
                    if code == 0:
                        continue  # an acknowledgement
                    raise TaskstatsError(code, os.strerror(code))
                if kind == NLMSG_DONE:
                    raise TaskstatsError(errno.ENODATA, "empty taskstats answer")
                return msg[_GENL.size :]


@dataclass
class _Sums:
    cpu_ns: int = 0
    blkio_ns: int = 0


class DelayCollector(Component):
    """container_resources_{cpu,disk}_delay_seconds_total, summed over each container's
    processes. Readings every `interval` seconds of `tick`; the series appear once the first
    reading of a container is taken."""

    name = "taskstats"

    def __init__(self, registry: Registry, interval: float = 5.0,
                 client: TaskstatsClient | None = None) -> None:
        self.registry = registry
        self.interval = interval
        self._client = client if client is not None else TaskstatsClient()
        self._open = False
        self._last_read: float | None = None
        self._lock = threading.Lock()
        self._sums: dict[str, _Sums] = {}
        # container id -> (pid, start ticks) -> the process's last reading
        self._seen: dict[str, dict[tuple[int, int], Delays]] = {}
        self.queries = 0
        self.errors = 0

    def attach(self, programs: Programs | None) -> None:
        """Open the netlink socket (no BPF programs are used)."""
        try:
            self._client.open()
            self._client.tgid(os.getpid())  # the kernel checks CAP_NET_ADMIN per request
            self._open = True
        except OSError as e:
            self._client.close()
            why = " (the agent needs CAP_NET_ADMIN)" if e.errno in (errno.EPERM, errno.EACCES) else ""
            log.warning("taskstats unavailable (%s)%s: no container CPU and disk delay metrics", e, why)

    def tick(self, now: float, gone: list[str]) -> None:
        with self._lock:
            for cid in gone:
                self._sums.pop(cid, None)
                self._seen.pop(cid, None)
        if not self._open:
            return
        if self._last_read is not None and now - self._last_read < self.interval:
            return
        self._last_read = now
        self.update()

    def update(self) -> None:
        """Take a reading of every process of every reported container."""
        for c in self.registry.containers():
            prev = self._seen.get(c.id, {})
            cur: dict[tuple[int, int], Delays] = {}
            d_cpu = d_blk = 0
            for pid in list(c.pids):
                p = self.registry.process(pid)
                if p is None:
                    continue
                try:
                    self.queries += 1
                    d = self._client.tgid(pid)
                except OSError as e:
                    self.errors += 1
                    if e.errno in (errno.EPERM, errno.EACCES, errno.EBADF):
                        log.warning("taskstats refused (%s): container delay metrics stop; "
                                    "the agent needs CAP_NET_ADMIN after start", e)
                        self._open = False
                        self._client.close()
                        return
                    continue
                if d is None:
                    continue  # exited since the registry saw it
                key = (pid, p.start_ticks)
                last = prev.get(key, Delays(0, 0))
                # A thread group's totals only grow; guard against a reading that went back.
                d_cpu += max(d.cpu_ns - last.cpu_ns, 0)
                d_blk += max(d.blkio_ns - last.blkio_ns, 0)
                cur[key] = Delays(max(d.cpu_ns, last.cpu_ns), max(d.blkio_ns, last.blkio_ns))
            with self._lock:
                s = self._sums.setdefault(c.id, _Sums())
                s.cpu_ns += d_cpu
                s.blkio_ns += d_blk
                self._seen[c.id] = cur

    def collect(self, f: Families) -> None:
        with self._lock:
            sums = {cid: (s.cpu_ns, s.blkio_ns) for cid, s in self._sums.items()}
        for c in self.registry.containers():
            got = sums.get(c.id)
            if got is None:
                continue
            lbl = {"container_id": c.id, "app_id": c.app_id}
            f.counter("container_resources_cpu_delay_seconds_total",
                      "Total time duration processes of the container have been waiting for a CPU "
                      "(while being runnable)", got[0] / 1e9, **lbl)
            f.counter("container_resources_disk_delay_seconds_total",
                      "Total time duration processes of the container have been waiting for I/Os "
                      "to complete", got[1] / 1e9, **lbl)

    def self_metrics(self, f: Families) -> None:
        f.counter("coroot_agent_taskstats_queries_total", "taskstats readings of processes", self.queries)
        f.counter("coroot_agent_taskstats_errors_total", "taskstats readings that failed", self.errors)

    def close(self) -> None:
        self._open = False
        self._client.close()
