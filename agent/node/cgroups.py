"""Container resource metrics (reference §1, Container resources) read from each container's
cgroup at scrape time, v1 and v2.

On a hybrid host a v1 controller's files are read only when the process sits in the same path
in that controller as in the hierarchy that named the container: a v1 group that a container
merely shares with the rest of the host would attribute other processes' usage to it.
"""

from __future__ import annotations

import os

from agent.component import Component
from agent.containers import cgroup as cg
from agent.containers.registry import Container, Registry
from agent.containers.systemd import SystemdUnits
from agent.metrics import Families

_NO_LIMIT = 1 << 60


class CgroupCollector(Component):
    name = "cgroups"

    def __init__(self, registry: Registry, sysfs: str = "/sys", systemd: SystemdUnits | None = None) -> None:
        self.registry = registry
        self.systemd = systemd  # systemd_triggered_by and systemd_type of systemd services
        self.layout = registry.layout
        self.sysfs = sysfs
        self._devnames: dict[str, str] = {}

    def _v2(self, c: Container) -> str | None:
        if c.subsystems.get("") == c.cgroup_path:
            return self.layout.v2_path(c.cgroup_path)
        return None

    def _v1(self, c: Container, ctl: str) -> str | None:
        if c.subsystems.get(ctl) == c.cgroup_path:
            return self.layout.v1_path(ctl, c.cgroup_path)
        return None

    def collect(self, f: Families) -> None:
        for c in self.registry.containers():
            lbl = {"container_id": c.id, "app_id": c.app_id}
            unit = self.systemd.get(c.id) if self.systemd is not None else None
            f.gauge("container_info", "container metadata", 1, **lbl, image=c.image,
                    systemd_triggered_by=unit.triggered_by if unit else "", systemd_type=unit.type if unit else "")
            f.counter("container_oom_kills_total", "processes killed by the OOM killer", c.oom_kills, **lbl)
            self._cpu(f, c, lbl)
            self._memory(f, c, lbl)
            self._pressure(f, c, lbl)
            self._io(f, c, lbl)

    def _cpu(self, f: Families, c: Container, lbl: dict[str, str]) -> None:
        v2 = self._v2(c)
        usage = throttled = limit = None
        if v2:
            st = cg.read_kv(os.path.join(v2, "cpu.stat"))
            if "usage_usec" in st:
                usage = st["usage_usec"] / 1e6
            if "throttled_usec" in st:
                throttled = st["throttled_usec"] / 1e6
            mx = (cg.read_text(os.path.join(v2, "cpu.max")) or "").split()
            if len(mx) == 2 and mx[0] != "max":
                limit = int(mx[0]) / int(mx[1])
        acct = self._v1(c, "cpuacct")
        if usage is None and acct:
            ns = cg.read_int(os.path.join(acct, "cpuacct.usage"))
            usage = ns / 1e9 if ns is not None else None
        cpu = self._v1(c, "cpu")
        if cpu:
            if throttled is None:
                st = cg.read_kv(os.path.join(cpu, "cpu.stat"))
                if "throttled_time" in st:
                    throttled = st["throttled_time"] / 1e9
            if limit is None:
                quota = cg.read_int(os.path.join(cpu, "cpu.cfs_quota_us"))
                period = cg.read_int(os.path.join(cpu, "cpu.cfs_period_us"))
                if quota and quota > 0 and period:
                    limit = quota / period
        if usage is not None:
            f.counter("container_resources_cpu_usage_seconds_total", "CPU time used", usage, **lbl)
        if throttled is not None:
            f.counter("container_resources_cpu_throttled_seconds_total", "time throttled by the CPU limit", throttled, **lbl)
        if limit is not None:
            f.gauge("container_resources_cpu_limit_cores", "CPU limit in cores", limit, **lbl)

    def _memory(self, f: Families, c: Container, lbl: dict[str, str]) -> None:
        v2 = self._v2(c)
        rss = cache = limit = None
        if v2 and os.path.exists(os.path.join(v2, "memory.stat")):
            st = cg.read_kv(os.path.join(v2, "memory.stat"))
            rss, cache = st.get("anon"), st.get("file")
            mx = (cg.read_text(os.path.join(v2, "memory.max")) or "").strip()
            limit = int(mx) if mx.isdigit() else None
        mem = self._v1(c, "memory")
        if rss is None and mem:
            st = cg.read_kv(os.path.join(mem, "memory.stat"))
            rss, cache = st.get("total_rss"), st.get("total_cache")
            limit = cg.read_int(os.path.join(mem, "memory.limit_in_bytes"))
        if rss is not None:
            f.gauge("container_resources_memory_rss_bytes", "anonymous memory", rss, **lbl)
        if cache is not None:
            f.gauge("container_resources_memory_cache_bytes", "page cache", cache, **lbl)
        if limit is not None and limit < _NO_LIMIT:
            f.gauge("container_resources_memory_limit_bytes", "memory limit", limit, **lbl)

    def _pressure(self, f: Families, c: Container, lbl: dict[str, str]) -> None:
        v2 = self._v2(c)
        if not v2:
            return
        for res, name in (("cpu", "cpu_pressure"), ("memory", "memory_pressure"), ("io", "io_pressure")):
            for kind, secs in cg.read_pressure(os.path.join(v2, f"{res}.pressure")).items():
                f.counter(f"container_resources_{name}_waiting_seconds_total",
                          f"time stalled on {res} (PSI)", secs, **lbl, kind=kind)

    def _io(self, f: Families, c: Container, lbl: dict[str, str]) -> None:
        v2 = self._v2(c)
        stats = cg.read_io_stat(os.path.join(v2, "io.stat")) if v2 else {}
        blkio = self._v1(c, "blkio")
        if not stats and blkio:
            stats = cg.read_blkio(os.path.join(blkio, "blkio.throttle.io_service_bytes"),
                                  os.path.join(blkio, "blkio.throttle.io_serviced"))
        for majmin, st in stats.items():
            dev = {"mount_point": "", "device": self._devname(majmin), "volume": ""}
            for metric, key in (("reads", "rios"), ("read_bytes", "rbytes"),
                                ("writes", "wios"), ("written_bytes", "wbytes")):
                if key in st:
                    f.counter(f"container_resources_disk_{metric}_total", f"disk {metric.replace('_', ' ')}",
                              st[key], **lbl, **dev)

    def _devname(self, majmin: str) -> str:
        name = self._devnames.get(majmin)
        if name is None:
            name = majmin
            for line in (cg.read_text(f"{self.sysfs}/dev/block/{majmin}/uevent") or "").splitlines():
                if line.startswith("DEVNAME="):
                    name = line[8:]
            if len(self._devnames) < 4096:
                self._devnames[majmin] = name
        return name
