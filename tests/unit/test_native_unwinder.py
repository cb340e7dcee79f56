"""agent/profiling/native.py without a kernel: the row allocator, and the unwinder against a
procfs of this test's own making (maps files naming real libraries of this machine) with
in-memory stand-ins for the BPF maps (the kernel side is tested by
tests/system/test_profiler_unwind.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.profiling import native, unwind
from agent.profiling.native import NativeMaps, NativeUnwinder, RowSpace
from agent.profiling.unwind import ROW

_built: dict[tuple[int, int], unwind.UnwindTable] = {}


def build(path: str) -> unwind.UnwindTable:
    """Each file's table built once for the whole module, by (device, inode): the unwinder
    builds from /proc/self/fd/N, whose numbers are reused for other files."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    if key not in _built:
        _built[key] = unwind.build(path)
    return _built[key]


@pytest.fixture(autouse=True)
def _cached_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "build", build)

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


class FakeMap:
    """A BPF map's Key/Leaf/set/delete/array_write as the unwinder uses them."""

    def __init__(self) -> None:
        self.d: dict[Any, Any] = {}
        self.writes = 0

    def key(self, *f: int) -> Any:
        return f if len(f) > 1 else f[0]

    def leaf(self, *f: int) -> Any:
        return f if len(f) > 1 else f[0]

    def set(self, k: Any, v: Any) -> bool:
        self.d[k] = v
        return True

    def delete(self, k: Any) -> bool:
        return self.d.pop(k, None) is not None

    def array_write(self, start: int, data: bytes) -> bool:
        self.writes += 1
        for i in range(len(data) // ROW.size):
            self.d[start + i] = data[i * ROW.size:(i + 1) * ROW.size]
        return True


def fake_maps() -> tuple[NativeMaps, dict[str, FakeMap]]:
    fm = {n: FakeMap() for n in ("rows", "procs", "maps", "stacks", "stats")}
    return NativeMaps(**fm), fm  # type: ignore[arg-type]


def test_row_space_first_fit_and_merge() -> None:
    s = RowSpace(100)
    a, b, c = s.alloc(30), s.alloc(30), s.alloc(30)
    assert (a, b, c) == (0, 30, 60)
    assert s.alloc(20) is None
    s.release(30, 30)
    assert s.alloc(40) is None
    s.release(0, 30)
    assert s.free == [(0, 60), (90, 10)]
    s.release(60, 30)
    assert s.free == [(0, 100)] and s.used == 0


def devino(path: str | Path) -> str:
    """'MAJOR:MINOR INODE' of a file, as /proc/PID/maps writes them."""
    st = os.stat(path)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x} {st.st_ino}"


class Procfs:
    """/proc/PID/maps and /proc/PID/root for made-up pids, with real files mapped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "root").mkdir()

    def add(self, pid: int, files: list[tuple[str, int, int]]) -> None:
        """files: (path, inode, start) mapped r-xp at offset of its first executable segment.
        The maps line carries the file's real device and inode (the unwinder reads only the
        file that is mapped); `inode` only names the entry in the tests."""
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        if not (d / "root").exists():
            (d / "root").symlink_to("/")
        lines = []
        for path, _inode, start in files:
            t = build(path)
            off, size, _ = next(s for s in t.segments if s[0] > 0)  # the text segment
            lines.append(f"{start:x}-{start + ((size + 4095) & ~4095):x} r-xp {off:08x} {devino(path)} {path}\n")
        (d / "maps").write_text("".join(lines))


def test_tables_built_once_per_file_and_shared(tmp_path: Path) -> None:
    procfs = Procfs(tmp_path)
    py = os.path.realpath("/usr/bin/python3")
    for pid in (101, 102, 103):
        procfs.add(pid, [(LIBC, 11, 0x7F0000000000 + pid * 0x10000000)])
    procfs.add(104, [(LIBC, 11, 0x7F5000000000), (py, 12, 0x560000000000)])
    maps, fm = fake_maps()
    u = NativeUnwinder(str(tmp_path))
    u.attach(maps)
    for pid in (101, 102, 103, 104):
        u.track(pid)
    u.step()
    assert u.built == 2  # libc once for four processes, python3 once
    assert fm["rows"].writes == 2
    libc_rows = len(build(LIBC))
    assert u.space.used == libc_rows + len(build(py))
    assert {p: v[0] for p, v in fm["procs"].d.items()} == {101: 1, 102: 1, 103: 1, 104: 2}
    assert sorted(v[1] for v in fm["procs"].d.values()) == [1, 2, 3, 4]  # a generation each
    start, end, bias, rows_start, rows_count = fm["maps"].d[(101, 0)]
    assert rows_count == libc_rows and fm["maps"].d[(102, 0)][3:] == (rows_start, rows_count)
    # the load bias puts libc's text at its file address: qsort's row found at qsort's address
    t = build(LIBC)
    off, _, vaddr = next(s for s in t.segments if s[0] > 0)
    assert bias == 0x7F0000000000 + 101 * 0x10000000 - off + off - vaddr + 0  # start - offset + p_offset - p_vaddr
    sizes = u.sizes()
    assert sizes["loaded_files"] == 2 and sizes["kernel_row_bytes"] == u.space.used * 8
    assert sizes["table_bytes"] == (libc_rows + len(build(py))) * 8


def test_untrack_clears_the_kernel_and_frees_room_when_needed(tmp_path: Path) -> None:
    procfs = Procfs(tmp_path)
    procfs.add(201, [(LIBC, 11, 0x7F0000000000)])
    py = os.path.realpath("/usr/bin/python3")
    procfs.add(202, [(py, 12, 0x560000000000)])
    maps, fm = fake_maps()
    libc_rows = len(build(LIBC))
    # room for one of the two files only
    u = NativeUnwinder(str(tmp_path), kernel_rows=max(libc_rows, len(build(py))) + 10)
    u.attach(maps)
    u.track(201)
    u.step()
    assert fm["procs"].d == {201: (1, 1)}
    u.track(202)
    u.step()
    assert u.dropped["rows_full"] == 1  # libc is still used by 201: python3 does not fit
    assert 202 not in fm["procs"].d
    u.untrack(201)
    u.step()
    assert fm["procs"].d == {} and fm["maps"].d == {}
    assert u.sizes()["loaded_files"] == 1  # libc stays loaded while nothing needs its room
    # python3 is looked at again at its next scan, and libc's room given to it
    u._tracked[202].next_scan = 0
    u._tracked[202].layout = ()
    u.step()
    assert fm["procs"].d == {202: (1, 2)}
    assert u.sizes()["loaded_files"] == 1


def test_a_file_without_a_table_is_remembered_and_counted(tmp_path: Path) -> None:
    procfs = Procfs(tmp_path)
    procfs.add(301, [(LIBC, 11, 0x7F0000000000)])
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x7fELF not really")
    (tmp_path / "301" / "maps").write_text((tmp_path / "301" / "maps").read_text()
                                           + f"7f1000000000-7f1000001000 r-xp 00000000 {devino(bogus)} {bogus}\n")
    maps, fm = fake_maps()
    u = NativeUnwinder(str(tmp_path))
    u.attach(maps)
    u.track(301)
    u.step()
    assert u.dropped["no_table"] == 1
    assert fm["procs"].d == {301: (1, 1)}
    u.track(301)  # an exec: read again, the bad file not built again
    u.step()
    assert u.dropped["no_table"] == 1


def test_the_table_cache_is_bounded(tmp_path: Path) -> None:
    procfs = Procfs(tmp_path)
    procfs.add(401, [(LIBC, 11, 0x7F0000000000)])
    py = os.path.realpath("/usr/bin/python3")
    procfs.add(402, [(py, 12, 0x560000000000)])
    u = NativeUnwinder(str(tmp_path), max_tables=1)
    u.attach(fake_maps()[0])
    u.track(401)
    u.track(402)
    u.step()
    assert u.sizes()["tables"] == 1 and u.dropped["table_evicted"] == 1
    assert u.sizes()["table_bytes"] == len(build(py).rows)


def test_rescans_follow_the_schedule(tmp_path: Path) -> None:
    procfs = Procfs(tmp_path)
    procfs.add(501, [(LIBC, 11, 0x7F0000000000)])
    now = [100.0]
    u = NativeUnwinder(str(tmp_path), clock=lambda: now[0], rescan=30)
    u.attach(fake_maps()[0])
    u.track(501)
    u.step()
    t = u._tracked[501]
    assert t.next_scan == 100 + native.RESCAN_AFTER[0]
    for after in native.RESCAN_AFTER[1:]:
        now[0] = t.next_scan
        u.step()
        assert t.next_scan == 100 + after
    now[0] = t.next_scan
    u.step()
    assert t.next_scan == now[0] + 30


def test_a_new_layout_is_never_walked_mixed_with_the_old(tmp_path: Path) -> None:
    """An exec (sh -> the program, as a test cgroup's spawn does it) moves libc: while the new
    mappings are written, the kernel must not find the pid (it would walk the new binary's
    mapping, then the old libc's)."""
    procfs = Procfs(tmp_path)
    py = os.path.realpath("/usr/bin/python3")
    procfs.add(601, [(py, 12, 0x560000000000), (LIBC, 11, 0x7F0000000000)])
    maps, fm = fake_maps()
    seen: list[bool] = []

    class Watched(FakeMap):
        def set(self, k: Any, v: Any) -> bool:
            seen.append(601 in fm["procs"].d)
            return super().set(k, v)

    fm["maps"] = Watched()
    maps = NativeMaps(**fm)  # type: ignore[arg-type]
    u = NativeUnwinder(str(tmp_path))
    u.attach(maps)
    u.track(601)
    u.step()
    assert fm["procs"].d == {601: (2, 1)} and seen == [False, False]
    procfs.add(601, [(py, 12, 0x561000000000), (LIBC, 11, 0x7F2000000000)])
    u.track(601)  # the exec
    u.step()
    assert seen == [False] * 4
    assert fm["procs"].d == {601: (2, 2)}  # a new generation: the kernel's cached rules of 1 are dead
    assert fm["maps"].d[(601, 1)][0] == 0x7F2000000000
    procfs.add(601, [(LIBC, 11, 0x7F2000000000)])  # fewer mappings
    u.track(601)
    u.step()
    assert seen == [False] * 5 and fm["procs"].d == {601: (1, 3)} and (601, 1) not in fm["maps"].d


def test_without_enable_native_unwinding_no_process_is_tracked_and_no_table_built() -> None:
    off = NativeUnwinder("/proc", enabled=False)
    off.track(os.getpid())
    assert off._pending == {} and off._tracked == {} and off.built == 0
    on = NativeUnwinder("/proc")
    on.track(os.getpid())
    assert on._pending == {os.getpid(): True}
