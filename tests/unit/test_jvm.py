"""agent.runtime.hsperfdata and agent.runtime.jvm: the perf data layout decoded from a file a real
JVM writes here during the test (OpenJDK from Debian's default-jdk-headless: the test fails,
not skips, without it) and from regions built by the documented layout, both byte orders;
malformed regions end in Invalid, never another exception; the JVM options that switch the
file off; and the component over a registry on a temporary procfs, reading the real JVM's file
through /proc/PID/root and refusing what a hostile container could lay out in its /tmp."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.containers.registry import Registry
from agent.metrics import Families
from agent.runtime import hsperfdata, jvm
from agent.runtime.hsperfdata import Invalid, NotReady
from tests.unit.test_families import CONST, exported, mismatches

ROOT = Path(__file__).resolve().parents[2]
GC_LOOP = ROOT / "tests" / "system" / "workloads" / "GcLoop.java"
UNIT = "/system.slice/java-app.service"


# ------------------------------------------------------------ a real JVM ---


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("javac") is None:
        pytest.fail("javac is missing: `scripts/setup.sh --test` installs default-jdk-headless")
    d = tmp_path_factory.mktemp("classes")
    subprocess.run(["javac", "-d", str(d), str(GC_LOOP)], check=True, timeout=120)
    return d


@dataclass
class RealJvm:
    proc: subprocess.Popen[str]
    started: dict
    done: dict

    @property
    def pid(self) -> int:
        return self.proc.pid

    def hsperfdata(self) -> Path:
        found = list(Path("/tmp").glob(f"hsperfdata_*/{self.pid}"))
        assert len(found) == 1, found
        return found[0]


def run_jvm(classes: Path, *jvm_args: str, seconds: float = 1.0) -> RealJvm:
    p = subprocess.Popen(["java", *jvm_args, "-cp", str(classes), "GcLoop", str(seconds)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    started = json.loads(p.stdout.readline())
    done = json.loads(p.stdout.readline())
    return RealJvm(p, started, done)


def stop(j: RealJvm) -> None:
    assert j.proc.stdin is not None
    j.proc.stdin.close()
    j.proc.wait(30)


@pytest.fixture(scope="module")
def real(classes: Path) -> Iterator[RealJvm]:
    j = run_jvm(classes)
    yield j
    stop(j)


def test_a_real_jvm_file_parses_with_the_jvms_own_version_command_and_gc_times(real: RealJvm) -> None:
    data = real.hsperfdata().read_bytes()
    pd = hsperfdata.parse(data)
    assert not pd.truncated
    assert pd.major == 2 and pd.byte_order == "<"
    assert len(pd.entries) == pd.num_entries
    assert pd.string("java.property.java.version") == real.started["java_version"]
    assert pd.string("sun.rt.javaCommand") == "GcLoop 1.0"
    assert pd.integer("sun.os.hrt.frequency") == 1_000_000_000
    e = pd.entries["sun.gc.collector.0.time"]
    assert (e.type, hsperfdata.UNITS[e.units], hsperfdata.VARIABILITY[e.variability]) == ("J", "ticks", "monotonic")
    e = pd.entries["java.property.java.version"]
    assert (e.type, hsperfdata.UNITS[e.units], hsperfdata.VARIABILITY[e.variability]) == ("B", "string", "constant")
    # The program is idle now: its counters are what its MXBeans reported when it stopped.
    s = jvm.JvmStats.from_perf(pd)
    assert s.jvm == "GcLoop 1.0" and s.java_version == real.started["java_version"]
    total_ms = real.done["gc_total_ms"]
    gc = sum(t for _, t in s.gc_time)
    assert total_ms / 1000 <= gc <= total_ms / 1000 * 1.1 + 0.002, (s.gc_time, real.done)
    assert {n for n, _ in s.gc_time} == {"G1 young collection pauses", "G1 full collection pauses",
                                         "G1 concurrent cycle pauses"}
    assert 0 < s.heap_used <= s.heap_size <= s.heap_max
    assert s.safepoint_time >= gc * 0.9 and s.safepoint_sync_time > 0


def test_only_wanted_entries_are_kept_and_refresh_rereads_their_values(real: RealJvm) -> None:
    data = bytearray(real.hsperfdata().read_bytes())
    pd = hsperfdata.parse(data, want=jvm._wanted)
    full = hsperfdata.parse(data)
    assert set(pd.entries) < set(full.entries)
    assert all(pd.entries[n].value == full.entries[n].value for n in pd.entries)
    assert not any(".agetable." in n for n in pd.entries)
    # a later copy of the same region: a changed value is read again in place
    e = pd.entries["sun.rt.safepointTime"]
    struct.pack_into("<q", data, e.offset, 123_456_789)
    assert pd.refresh(data)
    assert pd.seconds("sun.rt.safepointTime") == pytest.approx(0.123456789)
    # an entry added (the count and the structural time stamp move): parse again
    struct.pack_into("<I", data, 28, pd.num_entries + 1)
    assert not pd.refresh(data)


def test_a_jvm_run_with_minus_use_perf_data_writes_no_file_and_says_so(classes: Path) -> None:
    j = run_jvm(classes, "-XX:-UsePerfData", seconds=0.1)
    try:
        assert not list(Path("/tmp").glob(f"hsperfdata_*/{j.pid}"))
        cmdline = Path(f"/proc/{j.pid}/cmdline").read_bytes()
        assert jvm.is_jvm(cmdline)
        s = jvm.perf_setting(cmdline, b"")
        assert not s.enabled and "-XX:-UsePerfData in command line" in s.reason
    finally:
        stop(j)


# ------------------------------------------------- the documented layout ---


def build(entries: list[tuple[str, str, int, int, object]], order: str = "<", accessible: int = 1) -> bytes:
    """A perf data region laid out as HotSpot's perfMemory.hpp documents it."""
    body = b""
    for name, kind, units, var, value in entries:
        nb = name.encode() + b"\0"
        if kind == "J":
            data, vlen = struct.pack(order + "q", value), 0
        else:
            raw = str(value).encode() + b"\0"
            data, vlen = raw, len(raw)
        data_off = (20 + len(nb) + 7) // 8 * 8
        length = (data_off + len(data) + 7) // 8 * 8
        e = struct.pack(order + "iiiBBBBi", length, 20, vlen, ord(kind), 0, units, var, data_off)
        e += nb + b"\0" * (data_off - 20 - len(nb)) + data
        body += e + b"\0" * (length - len(e))
    used = 32 + len(body)
    prologue = hsperfdata.MAGIC + bytes([1 if order == "<" else 0, 2, 0, accessible])
    prologue += struct.pack(order + "IIqII", used, 0, 42, 32, len(entries))
    return prologue + body + b"\0" * 64


SYNTHETIC = [
    ("sun.rt.javaCommand", "B", 5, 1, "com.example.Main --port 8080"),
    ("java.property.java.version", "B", 5, 1, "21.0.2"),
    ("sun.os.hrt.frequency", "J", 6, 1, 1_000_000),  # microsecond ticks: times are divided by it
    ("sun.gc.collector.0.name", "B", 5, 1, "PSScavenge"),
    ("sun.gc.collector.0.time", "J", 3, 2, 1_500_000),
    ("sun.gc.collector.1.name", "B", 5, 1, "PSParallelCompact"),
    ("sun.gc.collector.1.time", "J", 3, 2, 250_000),
    ("sun.gc.generation.0.spaces", "J", 1, 1, 2),
    ("sun.gc.generation.0.space.0.capacity", "J", 2, 3, 1000),
    ("sun.gc.generation.0.space.0.used", "J", 2, 3, 100),
    ("sun.gc.generation.0.space.0.maxCapacity", "J", 2, 1, 5000),
    ("sun.gc.generation.0.space.1.capacity", "J", 2, 3, 2000),
    ("sun.gc.generation.0.space.1.used", "J", 2, 3, 200),
    ("sun.gc.generation.0.space.1.maxCapacity", "J", 2, 1, 6000),
    ("sun.gc.generation.1.spaces", "J", 1, 1, 1),
    ("sun.gc.generation.1.space.0.capacity", "J", 2, 3, 30000),
    ("sun.gc.generation.1.space.0.used", "J", 2, 3, 3000),
    ("sun.gc.generation.1.space.0.maxCapacity", "J", 2, 1, 90000),
    ("sun.gc.generation.2.spaces", "J", 1, 1, 1),  # not a heap generation the node agent sums
    ("sun.gc.generation.2.space.0.capacity", "J", 2, 3, 7777),
    ("sun.rt.safepointTime", "J", 3, 2, 2_000_000),
    ("sun.rt.safepointSyncTime", "J", 3, 2, 40_000),
]


@pytest.mark.parametrize("order", ["<", ">"])
def test_a_region_built_by_the_documented_layout_gives_the_node_agents_numbers(order: str) -> None:
    pd = hsperfdata.parse(build(SYNTHETIC, order))
    assert pd.byte_order == order and len(pd.entries) == len(SYNTHETIC) and not pd.truncated
    s = jvm.JvmStats.from_perf(pd)
    assert s == jvm.JvmStats(jvm="com.example.Main --port 8080", java_version="21.0.2", heap_size=33000.0,
                             heap_used=3300.0, heap_max=101000.0,
                             gc_time=(("PSScavenge", 1.5), ("PSParallelCompact", 0.25)),
                             safepoint_time=2.0, safepoint_sync_time=0.04)


def test_bad_regions_are_invalid_and_a_region_not_yet_accessible_is_not_ready() -> None:
    good = build(SYNTHETIC)
    with pytest.raises(NotReady):
        hsperfdata.parse(build(SYNTHETIC, accessible=0))
    for bad, why in [(b"", "shorter"), (b"\0" * 32, "magic"), (good[:4] + b"\x07" + good[5:], "byte order"),
                     (good[:5] + b"\x01" + good[6:], "version")]:
        with pytest.raises(Invalid, match=why):
            hsperfdata.parse(bad)
    # an entry offset beyond the used bytes
    b = bytearray(good)
    struct.pack_into("<I", b, 24, len(good) + 100)
    with pytest.raises(Invalid, match="entry offset"):
        hsperfdata.parse(b)


def test_an_entry_past_the_used_region_ends_the_parse_and_keeps_what_came_before() -> None:
    good = build(SYNTHETIC)
    b = bytearray(good)
    used = struct.unpack_from("<I", b, 8)[0]
    struct.pack_into("<I", b, 8, used - 8)  # the last entry now ends past `used`
    pd = hsperfdata.parse(b)
    assert pd.truncated and len(pd.entries) == len(SYNTHETIC) - 1
    assert pd.string("sun.rt.javaCommand") == "com.example.Main --port 8080"


def test_random_damage_to_a_real_file_never_raises_anything_but_invalid(real: RealJvm) -> None:
    good = real.hsperfdata().read_bytes()
    rng = random.Random(22)
    for _ in range(3000):
        b = bytearray(good[:rng.choice([len(good), rng.randrange(0, 2048)])])
        for _ in range(rng.randrange(1, 8)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            pd = hsperfdata.parse(b)
        except Invalid:
            continue
        jvm.JvmStats.from_perf(pd)  # whatever decoded, the numbers come out without an exception


# ------------------------------------------------------------ JVM options ---


def cmd(*args: str) -> bytes:
    return b"\0".join(a.encode() for a in args) + b"\0"


def test_the_options_before_the_main_class_count_and_the_programs_own_do_not() -> None:
    assert jvm.jvm_options(cmd("java", "-Xmx1g", "-cp", "-XX:-UsePerfData", "Main", "-XX:-UsePerfData").split(b"\0")) \
        == [b"-Xmx1g", b"-cp"]
    assert jvm.perf_setting(cmd("java", "-jar", "app.jar", "-XX:-UsePerfData"), b"").enabled
    assert not jvm.perf_setting(cmd("/usr/bin/java", "-XX:-UsePerfData", "-jar", "app.jar"), b"").enabled
    s = jvm.perf_setting(cmd("java", "-XX:+PerfDisableSharedMem", "Main"), b"")
    assert s.enabled and not s.shared and "PerfDisableSharedMem" in s.reason


def test_the_last_option_wins_in_hotspots_order_of_environment_and_command_line() -> None:
    env = b"PATH=/bin\0JAVA_TOOL_OPTIONS=-Xss1m -XX:-UsePerfData\0"
    s = jvm.perf_setting(cmd("java", "Main"), env)
    assert not s.enabled and "JAVA_TOOL_OPTIONS" in s.reason
    assert jvm.perf_setting(cmd("java", "-XX:+UsePerfData", "Main"), env).enabled  # the command line comes later
    env2 = env + b"_JAVA_OPTIONS=-XX:-UsePerfData\0"
    assert not jvm.perf_setting(cmd("java", "-XX:+UsePerfData", "Main"), env2).enabled  # and _JAVA_OPTIONS last


def test_a_jvm_is_a_command_whose_first_word_ends_with_java() -> None:
    assert jvm.is_jvm(cmd("/usr/lib/jvm/java-17-openjdk-amd64/bin/java", "Main"))
    assert not jvm.is_jvm(cmd("python3", "java"))
    assert not jvm.is_jvm(b"")


# ------------------------------------------------- the component, on a procfs ---


class Procfs:
    """A procfs in a temporary directory with the registry's files, and a cgroupfs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "cgroup" / "unified").mkdir(parents=True)
        (root / "cgroup" / "unified" / "cgroup.controllers").write_text("")
        (root / "proc").mkdir()

    def add(self, pid: int, cmdline: bytes, process_root: Path, status: bytes | None = None,
            environ: bytes = b"") -> None:
        d = self.root / "proc" / str(pid)
        d.mkdir()
        fields = ["S"] + ["0"] * 18 + ["100"] + ["0"] * 20
        (d / "stat").write_text(f"{pid} (java) " + " ".join(fields) + "\n")
        (d / "cgroup").write_text(f"0::{UNIT}\n")
        (d / "environ").write_bytes(environ)
        (d / "cmdline").write_bytes(cmdline)
        (d / "status").write_bytes(status or f"Name:\tjava\nNSpid:\t{pid}\t7\n".encode())
        (d / "root").symlink_to(process_root)
        (self.root / "cgroup" / "unified" / UNIT.lstrip("/")).mkdir(parents=True, exist_ok=True)


def component(tmp_path: Path) -> tuple[Procfs, Registry, jvm.JvmMetrics]:
    fs = Procfs(tmp_path)
    reg = Registry(procfs=str(tmp_path / "proc"), cgroupfs=str(tmp_path / "cgroup"), min_container_age=0)
    m = jvm.JvmMetrics(reg, procfs=str(tmp_path / "proc"))
    reg.subscribe(m.on_process)
    return fs, reg, m


def series(m: jvm.JvmMetrics, reg: Registry) -> dict[str, list[tuple[dict[str, str], float]]]:
    f = Families({})
    m.collect(f)
    return {fam.name: [(s.labels, s.value) for s in fam.samples] for fam in f}


def test_the_component_reads_a_real_jvm_through_its_proc_root_as_the_node_agent_names_it(
        tmp_path: Path, real: RealJvm) -> None:
    fs, reg, m = component(tmp_path)
    pid = real.pid
    fs.add(pid, Path(f"/proc/{pid}/cmdline").read_bytes(), Path(f"/proc/{pid}/root"),
           status=Path(f"/proc/{pid}/status").read_bytes())
    reg.scan()
    m.round()
    d = m.describe(pid)
    assert d is not None and d["status"] == "ok", d
    assert d["hsperfdata"] == f"/tmp/{real.hsperfdata().parent.name}/{pid}"
    got = series(m, reg)
    ct = {"container_id": UNIT, "app_id": reg.container(UNIT).app_id}  # type: ignore[union-attr]
    assert got["container_jvm_info"] == [({**ct, "jvm": "GcLoop 1.0", "java_version": real.started["java_version"]}, 1.0)]
    gcs = {lb["gc"]: v for lb, v in got["container_jvm_gc_time_seconds"]}
    assert real.done["gc_total_ms"] / 1000 <= sum(gcs.values()) <= real.done["gc_total_ms"] / 1000 * 1.1 + 0.002
    for name in ("container_jvm_heap_size_bytes", "container_jvm_heap_used_bytes", "container_jvm_heap_max_size_bytes",
                 "container_jvm_safepoint_time_seconds", "container_jvm_safepoint_sync_time_seconds"):
        [(labels, value)] = got[name]
        assert labels == {**ct, "jvm": "GcLoop 1.0"} and value > 0, name
    # Each family has the node agent's name, type (the times: counters without _total) and labels.
    f = Families(CONST)
    m.collect(f)
    assert mismatches(exported(list(f))) == {}
    # Nothing due yet: the next round reads nothing; a removed process is forgotten.
    m.round()
    assert m.reads == {"ok": 1}
    reg.remove(pid)
    assert m.describe(pid) is None and series(m, reg) == {}


def test_a_jvm_with_perf_data_off_is_described_and_never_read(tmp_path: Path) -> None:
    fs, reg, m = component(tmp_path)
    rootfs = tmp_path / "rootfs"
    (rootfs / "tmp").mkdir(parents=True)
    fs.add(4242, cmd("java", "-XX:-UsePerfData", "Main"), rootfs)
    reg.scan()
    m.round()
    m.round()
    assert m.describe(4242) == {"status": "disabled", "hsperfdata": None,
                                "detail": "perf data disabled (-XX:-UsePerfData in command line)"}
    assert m.reads == {} and series(m, reg) == {}


def test_the_namespaced_pid_names_the_file_and_the_user_directory_is_any(tmp_path: Path) -> None:
    fs, reg, m = component(tmp_path)
    rootfs = tmp_path / "rootfs"
    (rootfs / "tmp" / "hsperfdata_appuser").mkdir(parents=True)
    (rootfs / "tmp" / "hsperfdata_appuser" / "7").write_bytes(build(SYNTHETIC))  # NSpid 4243 -> 7
    (rootfs / "tmp" / "hsperfdata_appuser" / "4243").write_bytes(b"the host's pid: not this one")
    fs.add(4243, cmd("java", "Main"), rootfs)
    reg.scan()
    m.round()
    assert m.describe(4243) == {"status": "ok", "hsperfdata": "/tmp/hsperfdata_appuser/7",
                                "jvm": "com.example.Main --port 8080", "java_version": "21.0.2"}


@pytest.mark.parametrize("layout", ["file_link_out", "dir_link_out", "tmp_link_out", "fifo", "too_large"])
def test_what_a_hostile_container_lays_out_in_its_tmp_is_never_read(tmp_path: Path, layout: str) -> None:
    fs, reg, m = component(tmp_path)
    rootfs = tmp_path / "rootfs"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "7").write_bytes(build(SYNTHETIC))  # a valid file, outside the container's root
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "7").write_bytes(build(SYNTHETIC))  # inside the root, outside /tmp
    if layout == "tmp_link_out":
        (rootfs / "etc" / "hsperfdata_x").mkdir()
        (rootfs / "etc" / "hsperfdata_x" / "7").write_bytes(build(SYNTHETIC))
        (rootfs / "tmp").symlink_to("/etc")
    else:
        (rootfs / "tmp").mkdir()
        d = rootfs / "tmp" / "hsperfdata_x"
        if layout == "dir_link_out":
            d.symlink_to(str(outside))  # absolute: resolved inside the root, where it is not
        else:
            d.mkdir()
        if layout == "file_link_out":
            (d / "7").symlink_to("../../etc/7")
        elif layout == "fifo":
            os.mkfifo(d / "7")
        elif layout == "too_large":
            (d / "7").write_bytes(build(SYNTHETIC) + b"\0" * jvm.MAX_FILE_BYTES)
    fs.add(4244, cmd("java", "Main"), rootfs)
    reg.scan()
    m.round()
    d = m.describe(4244)
    assert d is not None
    want = {"file_link_out": "refused", "dir_link_out": "missing", "tmp_link_out": "refused", "fifo": "refused",
            "too_large": "too_large"}[layout]
    assert d["status"] == want, d
    assert series(m, reg) == {}
    assert "jvm" not in d
