"""agent/memory.py: RSS by part from smaps, and page_out on a real file mapping of this process."""

from __future__ import annotations

import mmap
import os
import tempfile

from agent import memory
from agent.metrics import Families

SMAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 123 /usr/bin/python3.11
Size:                132 kB
Rss:                 128 kB
Pss:                 128 kB
7f0000000000-7f0010000000 r-xp 00100000 08:01 456 /opt/venv/lib/python3.11/site-packages/chdb/_chdb.abi3.so
Size:             262144 kB
Rss:              150000 kB
7f1000000000-7f1001000000 r-xp 00000000 08:01 789 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:               50000 kB
7f1100000000-7f1100100000 r--p 00000000 08:01 790 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
Rss:                1000 kB
7f2000000000-7f2000800000 rw-p 00000000 00:00 0
Rss:                8192 kB
Anonymous:          8192 kB
55d0c1000000-55d0c3000000 rw-p 00000000 00:00 0                          [heap]
Rss:               30000 kB
7f3000000000-7f3000400000 rw-s 00000000 00:0e 1234                       anon_inode:bpf-map
Rss:                4096 kB
7f3100000000-7f3100001000 rw-s 00000000 00:0e 1235                       anon_inode:[perf_event]
Rss:                   4 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  40 kB
VmFlags: rd wr mr mw me gd ac
"""


def test_rss_parts_by_mapping() -> None:
    parts = memory.rss_parts(SMAPS.splitlines(keepends=True))
    kb = {k: v // 1024 for k, v in parts.items()}
    assert kb == {"engine_code": 150000, "compiler_code": 51000, "bpf_maps": 4096, "other_files": 128,
                  "anonymous": 8192 + 30000 + 4 + 40}


def test_part_of_names() -> None:
    assert memory.part_of("/x/chdb/_chdb.abi3.so") == "engine_code"
    assert memory.part_of("/usr/lib/libclang-cpp.so.14") == "compiler_code"
    assert memory.part_of("[anon:python]") == "anonymous"
    assert memory.part_of("/memfd:x (deleted)") == "anonymous"
    assert memory.part_of("anon_inode:bpf-ringbuf") == "bpf_maps"  # "bpf" in the name
    assert memory.part_of("/lib/x86_64-linux-gnu/libc.so.6") == "other_files"


def test_read_parts_of_this_process_adds_up() -> None:
    parts = memory.read_parts()
    with open("/proc/self/smaps_rollup") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Rss:"))
    assert set(parts) == set(memory.PARTS)
    assert abs(sum(parts.values()) - rss) <= 2 << 20  # read a moment apart


def test_page_out_gives_back_a_file_mappings_pages() -> None:
    """A file of 32 MB mapped and read in full: its pages are resident; page_out on its name
    gives them back (the kernel reclaims clean file pages), and reading them again works."""
    size = 32 << 20
    with tempfile.NamedTemporaryFile(prefix="pageout-probe-", dir="/var/tmp") as f:
        f.write(os.urandom(1 << 20) * 32)
        f.flush()
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            total = sum(m[i] for i in range(0, size, 4096))  # touch every page
            name = os.path.basename(f.name)
            resident = _rss_of(name)
            assert resident >= size * 0.9, resident
            given = memory.page_out([name])
            after = _rss_of(name)
            assert after <= size * 0.1, after
            assert given >= size * 0.8, given
            assert sum(m[i] for i in range(0, size, 4096)) == total  # the data is the file's, as before
    assert memory.page_out(["no-such-mapping-name"]) == 0


def _rss_of(name: str) -> int:
    rss, mine = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                mine = line.rstrip().endswith(name)
            elif head == "Rss:" and mine:
                rss += int(line.split()[1]) * 1024
    return rss


def test_self_metrics_series() -> None:
    m = memory.MemoryMetrics(interval=15)
    m._refresh(0.0)
    f = Families({})
    m.self_metrics(f)
    names = {fam.name for fam in f}
    assert names == {"coroot_agent_memory_bytes", "coroot_agent_memory_paged_out_bytes"}


def test_tune_malloc_on_glibc() -> None:
    assert memory.tune_malloc() is True  # Debian: glibc takes all three settings
