"""The profiler reads files that profiled processes name: a JIT's /tmp/perf-PID.map and the
ELF files of their mappings. Attacks from a process run as `nobody`, against the symbolizer
and the unwind-table builder the profiler runs (agent/profiling/symbols.py, native.py):

- its perf map is a symlink to a root-only file laid out as a perf map: the agent must not
  read it (before: the root-only file's "symbols" named the process's frames);
- its perf map is a FIFO: the agent must not block on it (before: open() waited forever and
  the profiler stopped);
- the file it maps is replaced by a FIFO, or by a symlink to another ELF file, after it was
  mapped: the agent reads no symbols and builds no table from the impostor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from agent.profiling.native import NativeUnwinder
from agent.profiling.symbols import Symbolizer, read_maps
from tests.system.helpers import NOBODY, NOBODY_UID

WAIT = 5.0  # a read that blocks fails the test after this long


def _call(fn, *args):  # type: ignore[no-untyped-def]
    """fn(*args) in a thread: (finished, result)."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(WAIT)
    return (not t.is_alive()), (out[0] if out else None)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of nobody's, waiting."""
    p = subprocess.Popen([*NOBODY, "sleep", "60"])
    time.sleep(0.2)
    yield p
    p.kill()
    p.wait()


def test_a_perf_map_symlinked_to_a_root_only_file_is_not_read(sleeper: subprocess.Popen[bytes]) -> None:
    secret = tempfile.NamedTemporaryFile("w", prefix="perf-secret-", dir="/root", delete=False)  # noqa: SIM115
    perf = f"/tmp/perf-{sleeper.pid}.map"
    try:
        secret.write("1000 100 SECRET_FROM_ROOT_ONLY_FILE\n")
        secret.close()
        os.chmod(secret.name, 0o600)
        # nobody makes the link: a process names its own perf map
        subprocess.run([*NOBODY, "ln", "-s", secret.name, perf], check=True)
        assert os.lstat(perf).st_uid == NOBODY_UID
        done, got = _call(Symbolizer()._perf_map, sleeper.pid)
        assert done
        assert got is None  # refused: the link leads out of /tmp
    finally:
        os.unlink(secret.name)
        if os.path.lexists(perf):
            os.unlink(perf)


def test_a_perf_map_that_is_a_fifo_does_not_block(sleeper: subprocess.Popen[bytes]) -> None:
    perf = f"/tmp/perf-{sleeper.pid}.map"
    try:
        subprocess.run([*NOBODY, "mkfifo", perf], check=True)
        done, got = _call(Symbolizer()._perf_map, sleeper.pid)
        assert done, "the symbolizer blocked on a FIFO"
        assert got is None
    finally:
        if os.path.lexists(perf):
            os.unlink(perf)


@pytest.mark.parametrize("impostor", ["fifo", "symlink"])
def test_a_mapped_file_replaced_after_mapping_is_not_read(impostor: str) -> None:
    """nobody runs its own copy of python3 from a directory it owns, then replaces the file at
    that path: a FIFO, or a symlink to another ELF (the system's /bin/true). The path in its
    maps is the same; the file there is not the one mapped."""
    d = tempfile.mkdtemp(prefix="mapped-", dir="/var/tmp")
    os.chmod(d, 0o755)
    exe = os.path.join(d, "py")
    shutil.copy(os.path.realpath(sys.executable), exe)
    os.chown(d, NOBODY_UID, NOBODY_UID)
    os.chown(exe, NOBODY_UID, NOBODY_UID)
    p = subprocess.Popen([*NOBODY, exe, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        [m] = [m for m in read_maps("/proc", p.pid) if m.path == exe]
        replace = (f"rm {exe} && mkfifo {exe}" if impostor == "fifo" else f"rm {exe} && ln -s /bin/true {exe}")
        subprocess.run([*NOBODY, "sh", "-c", replace], check=True)
        done, table = _call(Symbolizer()._binary, p.pid, m)
        assert done, "the symbolizer blocked"
        assert table is None
        unwinder = NativeUnwinder(procfs="/proc")
        done, table = _call(unwinder._table, p.pid, m, (m.dev, m.inode))
        assert done, "the unwind-table builder blocked"
        assert table is None and unwinder.dropped["not_opened"] == 1
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d, ignore_errors=True)
