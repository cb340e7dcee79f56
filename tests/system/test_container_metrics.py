"""Container metrics from taskstats, process command lines, process start times and open files,
produced by the components built directly on a real registry (fed by /proc scans) and the real
kernel: CPU and disk delay, application type of real servers, restarts of a container's
process, size and use of the filesystems a container writes to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from agent.component import Component
from agent.containers.apptype import AppTypeCollector
from agent.containers.disk import DiskCollector
from agent.containers.registry import Registry
from agent.containers.restarts import RestartCounter
from agent.containers.taskstats import DelayCollector
from agent.metrics import Families
from tests.system.helpers import TestCgroups, free_port, wait_for
from tests.system.servers import Nginx, Postgres, Redis

pytestmark = pytest.mark.agent_without("profiling", "l7")  # tests/system/conftest.py: families its tests never read

CLK_TCK = os.sysconf("SC_CLK_TCK")
SPIN = "while True: pass"


@pytest.fixture
def registry() -> Registry:
    r = Registry(min_container_age=0, dead_container_ttl=60)
    r.scan()
    return r


def wire(registry: Registry, comp: Component) -> Component:
    registry.subscribe(comp.on_process)
    comp.attach(None)
    return comp


def series(comp: Component, name: str, cid: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of `name` for container `cid`: labels other than container_id/app_id -> value."""
    f = Families({"machine_id": "m"})
    comp.collect(f)
    out = {}
    for fam in f:
        for s in fam.samples:
            if s.name == name and s.labels["container_id"] == cid:
                assert s.labels["app_id"] == "" and s.labels["machine_id"] == "m"  # not a Kubernetes id
                rest = tuple(sorted((k, v) for k, v in s.labels.items()
                                    if k not in ("container_id", "app_id", "machine_id")))
                out[rest] = s.value
    return out


def value(comp: Component, name: str, cid: str) -> float | None:
    found = series(comp, name, cid)
    assert len(found) <= 1
    return next(iter(found.values()), None)


def joined(cgroups: TestCgroups, cid: str, pid: int) -> bool:
    """The spawned shell has moved itself into the container's cgroup (scan only after that:
    the registry reads a process's cgroup when it first sees it)."""
    with open(os.path.join(cgroups.base, os.path.basename(cid), "cgroup.procs")) as f:
        return str(pid) in f.read().split()


def cpu_seconds(pid: int) -> float:
    """utime + stime from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ----------------------------------------------------------------- delays ---


def test_cpu_delay_of_two_spinners_sharing_one_cpu_matches_their_wait(
    registry: Registry, cgroups: TestCgroups,
) -> None:
    cid = cgroups.create("delay")
    cpu = max(os.sched_getaffinity(0))
    procs = [cgroups.spawn(cid, ["taskset", "-c", str(cpu), sys.executable, "-c", SPIN]) for _ in range(2)]
    assert wait_for(lambda: all(joined(cgroups, cid, p.pid) for p in procs), 2.0)
    time.sleep(0.5)  # both exec'd and spinning
    registry.scan()
    assert registry.container(cid) is not None and registry.container(cid).pids == {p.pid for p in procs}
    delays = DelayCollector(registry, interval=0)
    wire(registry, delays)

    def reading() -> tuple[float, float, float]:
        t = time.monotonic()
        delays.update()
        return t, sum(cpu_seconds(p.pid) for p in procs), value(delays, "container_resources_cpu_delay_seconds_total", cid) or 0.0

    t1, cpu1, d1 = reading()
    time.sleep(3.0)
    t2, cpu2, d2 = reading()
    # Each spinner is runnable all the time: whatever of the window it did not run, it waited.
    induced = 2 * (t2 - t1) - (cpu2 - cpu1)
    measured = d2 - d1
    assert induced >= 2.5, f"the spinners did not contend: {induced:.2f}s waited in {t2 - t1:.2f}s"
    assert abs(measured - induced) <= 0.2 * induced, f"taskstats says {measured:.3f}s, the test induced {induced:.3f}s"

    # A process that exits takes nothing from the counter; the other one keeps adding.
    procs[0].kill()
    procs[0].wait()
    registry.scan()
    delays.update()
    d3 = value(delays, "container_resources_cpu_delay_seconds_total", cid)
    assert d3 is not None and d3 >= d2
    assert value(delays, "container_resources_disk_delay_seconds_total", cid) is not None
    delays.close()


DIRECT_READER = r"""
import mmap, os, random, sys, time

def schedstat():
    with open("/proc/thread-self/schedstat") as f:
        on_cpu, runnable, _ = map(int, f.read().split())
    return on_cpu, runnable

path, want = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
blocks = os.fstat(fd).st_size // 4096
rand = random.Random(7)
# Reads in rounds until they have waited `want` seconds (a fast virtual disk answers a 4 KiB
# direct read in ~13 us, a slow one in ms), at most 30 s of reading.
blocked, start = 0.0, time.monotonic()
while blocked < want and time.monotonic() - start < 30:
    offsets = [b * 4096 for b in rand.choices(range(blocks), k=2000)]
    cpu0, wait0 = schedstat()
    t0 = time.perf_counter_ns()
    for off in offsets:
        os.preadv(fd, [buf], off)
    t1 = time.perf_counter_ns()
    cpu1, wait1 = schedstat()
    # The loop only ever blocks in the reads: whatever of it was neither on a CPU nor runnable
    # was spent waiting for the device.
    blocked += (t1 - t0 - (cpu1 - cpu0) - (wait1 - wait0)) / 1e9
print(blocked, flush=True)
time.sleep(60)
"""


@pytest.fixture
def delayacct() -> Iterator[None]:
    """Block I/O delay is recorded only with kernel.task_delayacct=1 (off by default since
    5.14): on for the test, then back to what it was."""
    path = "/proc/sys/kernel/task_delayacct"
    with open(path) as f:
        before = f.read().strip()
    with open(path, "w") as f:
        f.write("1")
    yield
    with open(path, "w") as f:
        f.write(before)


def test_disk_delay_is_the_time_a_process_waited_for_direct_reads(
    registry: Registry, cgroups: TestCgroups, delayacct: None,
) -> None:
    d = tempfile.mkdtemp(prefix="ca-disk-", dir="/var/tmp")
    try:
        data = os.path.join(d, "data")
        with open(data, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        cid = cgroups.create("disk")
        p = cgroups.spawn(cid, [sys.executable, "-c", DIRECT_READER, data, "0.3"], stdout=subprocess.PIPE)
        assert p.stdout is not None
        blocked = float(p.stdout.readline())
        registry.scan()
        delays = DelayCollector(registry, interval=0)
        wire(registry, delays)
        delays.update()
        measured = value(delays, "container_resources_disk_delay_seconds_total", cid)
        assert measured is not None
        with open(f"/proc/{p.pid}/stat", "rb") as f:
            kernel_ticks = int(f.read().rsplit(b")", 1)[1].split()[39])  # delayacct_blkio_ticks
        # What the kernel's own per-process field says, to its tick; and the time the reader
        # was blocked in its reads, measured by the reader.
        assert abs(measured - kernel_ticks / CLK_TCK) <= 1.0 / CLK_TCK, (measured, kernel_ticks)
        assert blocked >= 0.15, f"the reads hardly waited ({blocked:.3f}s): no delay was induced"
        assert abs(measured - blocked) <= 0.2 * blocked, f"taskstats says {measured:.3f}s, blocked {blocked:.3f}s"
        delays.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


DROPPED = """
import errno, logging, sys
from agent import caps
from agent.containers.registry import Registry
from agent.containers.taskstats import DelayCollector, TaskstatsClient
from agent.metrics import Families
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
registry = Registry(min_container_age=0)
registry.scan()
client = TaskstatsClient()
collector = DelayCollector(registry, interval=0, client=client)
collector.attach(None)  # opens the client, before the drop as in the agent
keep = caps.keep_after_start() - {"CAP_NET_ADMIN"}
caps.drop_to(keep | {"CAP_NET_ADMIN"} if sys.argv[1] == "with" else keep)
try:
    print("direct:", "ok" if client.tgid(1) is not None else "none")
except OSError as e:
    print("direct:", errno.errorcode[e.errno])
collector.update()
f = Families({})
collector.collect(f)
print("series:", sum(len(m.samples) for m in f), "errors:", collector.errors)
"""


def test_taskstats_needs_cap_net_admin_after_capabilities_are_dropped(cgroups: TestCgroups) -> None:
    """The kernel checks CAP_NET_ADMIN on each request, not only when the socket is opened:
    without it (in the set the agent keeps after start) the answer is EPERM, and the collector
    stops, says why, and exports nothing rather than zeros."""
    cid = cgroups.create("caps")
    p = cgroups.spawn(cid, ["sleep", "60"])
    assert wait_for(lambda: joined(cgroups, cid, p.pid), 2.0)

    def run(mode: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", DROPPED, mode], capture_output=True, text=True,
                             check=True, cwd=os.getcwd()).stdout
        return out.strip().splitlines()

    without = run("without")
    assert without[0] == "direct: EPERM"
    assert "CAP_NET_ADMIN" in without[1] and without[-1] == "series: 0 errors: 1", without
    kept = run("with")
    assert kept[0] == "direct: ok"
    series_n = int(kept[-1].split()[1])
    assert series_n >= 2 and kept[-1].endswith("errors: 0"), kept  # cpu and disk, per container


# ---------------------------------------------------------- application type ---


def test_application_type_of_real_postgres_redis_nginx_and_go_servers(
    registry: Registry, cgroups: TestCgroups,
) -> None:
    servers: list[Postgres | Redis | Nginx] = []
    prom_dir = tempfile.mkdtemp(prefix="ca-prom-")
    try:
        pg_cid, redis_cid, nginx_cid, prom_cid, py_cid = (cgroups.create(n) for n in ("pg", "redis", "nginx", "prom", "py"))
        servers.append(Postgres().start(cgroups, pg_cid))
        servers.append(Redis().start(cgroups, redis_cid))
        servers.append(Nginx(workers=2).start(cgroups, nginx_cid))
        with open(os.path.join(prom_dir, "prometheus.yml"), "w") as f:
            f.write("global: {scrape_interval: 1h}\nscrape_configs: []\n")
        prom = cgroups.spawn(prom_cid, ["prometheus", f"--config.file={prom_dir}/prometheus.yml",
                                        f"--storage.tsdb.path={prom_dir}/tsdb",
                                        f"--web.listen-address=127.0.0.1:{free_port()}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        py = cgroups.spawn(py_cid, ["/usr/bin/python3", "-c", "import time; time.sleep(60)"])
        assert wait_for(lambda: joined(cgroups, prom_cid, prom.pid) and joined(cgroups, py_cid, py.pid), 2.0)
        time.sleep(0.5)  # exec'd
        registry.scan()
        apps = AppTypeCollector(registry)
        wire(registry, apps)
        apps.tick(time.monotonic(), [])

        def types(cid: str) -> set[str]:
            return {dict(k)["application_type"] for k, v in series(apps, "container_application_type", cid).items() if v == 1}

        assert types(pg_cid) == {"postgres"}
        assert types(redis_cid) == {"redis"}
        assert types(nginx_cid) == {"nginx"}
        assert types(prom_cid) == {"prometheus", "golang"}  # Debian's Prometheus is a Go binary
        assert types(py_cid) == {"python"}

        # Stopped: its processes leave the registry and the series goes with them.
        servers[1].stop()
        registry.scan()
        apps.tick(time.monotonic(), [])
        assert types(redis_cid) == set()
        assert types(nginx_cid) == {"nginx"}
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(prom_dir, ignore_errors=True)


# ---------------------------------------------------------------- restarts ---


def test_restarts_are_counted_when_a_containers_process_is_replaced(
    registry: Registry, cgroups: TestCgroups,
) -> None:
    cid = cgroups.create("restart")
    counter = RestartCounter(registry)
    wire(registry, counter)

    def restarts() -> float | None:
        registry.scan()
        counter.tick(time.monotonic(), registry.housekeeping())
        return value(counter, "container_restarts_total", cid)

    def start(*argv: str) -> subprocess.Popen[bytes]:
        p = cgroups.spawn(cid, argv)
        assert wait_for(lambda: joined(cgroups, cid, p.pid), 2.0)
        return p

    def stop(p: subprocess.Popen[bytes]) -> None:
        p.kill()
        p.wait()

    first = start("sleep", "60")
    assert restarts() == 0
    # A second process (which forks a child, then execs) while the first lives is no restart,
    # nor is the first one leaving.
    second = start("sh", "-c", "sleep 0.3; exec sleep 60")
    assert restarts() == 0
    time.sleep(0.5)
    assert registry.add(second.pid) is not None  # what the exec event does
    assert restarts() == 0
    stop(first)
    assert restarts() == 0
    live = second
    for expected in (1, 2, 3):
        stop(live)
        assert restarts() == expected - 1
        assert registry.container(cid) is not None and not registry.container(cid).pids
        time.sleep(0.02)  # start times are in clock ticks: the replacement starts a tick later
        live = start("sleep", "60")
        assert restarts() == expected


# -------------------------------------------------------------------- disk ---

WRITER = r"""
import os, sys, time
w = open(sys.argv[1], "wb")
w.write(os.urandom(1 << 20))
w.flush()
if not sys.argv[1].startswith("/dev/"):
    os.fsync(w.fileno())
r = open(sys.argv[2], "rb")  # read-only: not a filesystem the container writes to
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def loop_fs() -> Iterator[str]:
    """A 32 MiB ext4 filesystem on a loop device, mounted on a fresh directory: only the test
    writes to it, so its statfs does not move under the test."""
    d = tempfile.mkdtemp(prefix="ca-loopfs-", dir="/var/tmp")
    image, mnt = os.path.join(d, "image"), os.path.join(d, "mnt")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", image, mnt], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def whole_device(path: str) -> str:
    """The whole block device under `path`, by sysfs: a partition's parent, or itself."""
    dev = os.stat(path).st_dev
    sys_path = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.path.exists(os.path.join(sys_path, "partition")):
        sys_path = os.path.dirname(sys_path)
    return os.path.basename(sys_path)


def test_disk_size_used_reserved_are_statfs_of_the_filesystems_a_container_writes_to(
    registry: Registry, cgroups: TestCgroups, loop_fs: str,
) -> None:
    on_loop, on_root, reader = (cgroups.create(n) for n in ("disk-loop", "disk-root", "disk-reader"))
    scratch = tempfile.mkdtemp(prefix="ca-disk-", dir="/var/tmp")
    try:
        with open(os.path.join(loop_fs, "existing"), "wb") as f:
            f.write(b"x" * 4096)
        started = [
            cgroups.spawn(on_loop, [sys.executable, "-c", WRITER, f"{loop_fs}/data", "/etc/hostname"], stdout=subprocess.PIPE),
            cgroups.spawn(on_root, [sys.executable, "-c", WRITER, f"{scratch}/data", f"{loop_fs}/existing"], stdout=subprocess.PIPE),
            cgroups.spawn(reader, [sys.executable, "-c", WRITER, "/dev/null", f"{loop_fs}/existing"], stdout=subprocess.PIPE),
        ]
        for p in started:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        registry.scan()
        disks = DiskCollector(registry, interval=30)
        wire(registry, disks)
        disks.tick(100.0, [])

        sizes = {name: series(disks, f"container_resources_disk_{name}_bytes", on_loop) for name in ("size", "used", "reserved")}
        st = os.statvfs(loop_fs)
        labels = (("device", ""), ("mount_point", loop_fs), ("volume", ""))  # a loop device is no disk
        assert sizes == {
            "size": {labels: st.f_blocks * st.f_bsize},
            "used": {labels: (st.f_blocks - st.f_bfree) * st.f_bsize},
            "reserved": {labels: (st.f_bfree - st.f_bavail) * st.f_bsize},
        }
        assert st.f_bfree > st.f_bavail  # ext4 reserves 5% by default: reserved is not a zero by chance

        root = series(disks, "container_resources_disk_size_bytes", on_root)
        st = os.statvfs("/")
        labels = (("device", whole_device("/")), ("mount_point", "/"), ("volume", ""))
        assert root == {labels: st.f_blocks * st.f_bsize}
        used = series(disks, "container_resources_disk_used_bytes", on_root)[labels]
        assert abs(used - (st.f_blocks - os.statvfs("/").f_bfree) * st.f_bsize) <= 64 << 20  # others write to / too

        assert series(disks, "container_resources_disk_size_bytes", reader) == {}

        # Sizes are read through a live process of the container: with none left, no series.
        started[1].kill()
        started[1].wait()
        registry.scan()
        disks.tick(110.0, [])  # before the next scan of open files
        assert series(disks, "container_resources_disk_size_bytes", on_root) == {}
        assert len(series(disks, "container_resources_disk_size_bytes", on_loop)) == 1
        # A filesystem no longer mounted in the container's view is forgotten at the next scan,
        # though the writer still holds its file.
        subprocess.run(["umount", "-l", loop_fs], check=True, capture_output=True)
        disks.tick(131.0, [])
        assert started[0].poll() is None
        assert series(disks, "container_resources_disk_size_bytes", on_loop) == {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
