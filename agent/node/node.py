"""Node metrics (reference §1, Node) read from /proc and /sys at scrape time.

A component (agent/component.py) that only collects: reads files when scraped, keeps nothing
between scrapes.
"""

from __future__ import annotations

import logging
import os
import platform
import socket

import psutil

from agent import __version__
from agent.component import Component
from agent.containers.cgroup import read_text
from agent.metrics import Families
from agent.node.cloud import cloud_info

log = logging.getLogger(__name__)

_CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_SKIP_BLOCK = ("loop", "ram", "zram", "fd", "sr")


class NodeCollector(Component):
    name = "node"

    def __init__(self, procfs: str = "/proc", sysfs: str = "/sys") -> None:
        self.procfs = procfs
        self.sysfs = sysfs
        self.hz = os.sysconf("SC_CLK_TCK")
        self.cloud = cloud_info(sysfs)  # DMI does not change while the machine runs
        log.info("cloud provider: %s", self.cloud["provider"] or "none recognised")

    def collect(self, f: Families) -> None:
        f.gauge("node_agent_info", "coroot-agent version", 1, version=__version__)
        hostname = (read_text(f"{self.procfs}/sys/kernel/hostname") or socket.gethostname()).strip()
        f.gauge("node_info", "node hostname and kernel", 1, hostname=hostname, kernel_version=platform.release())
        f.gauge("node_cloud_info", "cloud provider and instance (provider from DMI only)", 1, **self.cloud)
        uptime = read_text(f"{self.procfs}/uptime")
        if uptime:
            f.gauge("node_uptime_seconds", "seconds since boot", float(uptime.split()[0]))
        self._cpu(f)
        self._memory(f)
        self._disks(f)
        self._net(f)

    def _cpu(self, f: Families) -> None:
        text = read_text(f"{self.procfs}/stat") or ""
        cores = 0
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "cpu":
                for mode, v in zip(_CPU_MODES, parts[1:], strict=False):
                    f.counter("node_resources_cpu_usage_seconds_total", "CPU time by mode",
                              int(v) / self.hz, mode=mode)
            elif parts[0].startswith("cpu"):
                cores += 1
        f.gauge("node_resources_cpu_logical_cores", "logical CPU cores", cores)

    def _memory(self, f: Families) -> None:
        info = {}
        for line in (read_text(f"{self.procfs}/meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                info[key] = int(parts[0]) * 1024
        for name, key in (("total", "MemTotal"), ("free", "MemFree"),
                          ("available", "MemAvailable"), ("cached", "Cached")):
            if key in info:
                f.gauge(f"node_resources_memory_{name}_bytes", f"memory {name}", info[key])

    def _disks(self, f: Families) -> None:
        for line in (read_text(f"{self.procfs}/diskstats") or "").splitlines():
            p = line.split()
            if len(p) < 14:
                continue
            dev = p[2]
            if dev.startswith(_SKIP_BLOCK) or not os.path.exists(f"{self.sysfs}/block/{dev}"):
                continue  # partitions and virtual devices
            v = [int(x) for x in p[3:14]]
            f.counter("node_resources_disk_reads_total", "reads completed", v[0], device=dev)
            f.counter("node_resources_disk_read_bytes_total", "bytes read", v[2] * 512, device=dev)
            f.counter("node_resources_disk_read_time_seconds_total", "time reading", v[3] / 1000, device=dev)
            f.counter("node_resources_disk_writes_total", "writes completed", v[4], device=dev)
            f.counter("node_resources_disk_written_bytes_total", "bytes written", v[6] * 512, device=dev)
            f.counter("node_resources_disk_write_time_seconds_total", "time writing", v[7] / 1000, device=dev)
            f.counter("node_resources_disk_io_time_seconds_total", "time doing I/O", v[9] / 1000, device=dev)

    def _net(self, f: Families) -> None:
        base = f"{self.sysfs}/class/net"
        try:
            ifaces = sorted(os.listdir(base))
        except OSError:
            return
        addrs = psutil.net_if_addrs()
        for name in ifaces:
            if name == "lo":
                continue
            st = f"{base}/{name}/statistics"
            for metric, stat in (("received_bytes", "rx_bytes"), ("transmitted_bytes", "tx_bytes"),
                                 ("received_packets", "rx_packets"), ("transmitted_packets", "tx_packets")):
                v = read_text(f"{st}/{stat}")
                if v is not None:
                    f.counter(f"node_net_{metric}_total", metric.replace("_", " "), int(v), interface=name)
            oper = (read_text(f"{base}/{name}/operstate") or "").strip()
            f.gauge("node_net_interface_up", "interface is up", 1 if oper in ("up", "unknown") else 0, interface=name)
            for a in addrs.get(name, ()):
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    f.gauge("node_net_interface_ip", "interface address", 1, interface=name, ip=a.address.split("%")[0])
