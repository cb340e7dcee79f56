"""agent.runtime.python without the kernel: which processes are Python (the node agent's rule),
which mapped files are C libraries, and the address of the default version of
pthread_cond_timedwait in this machine's glibc, checked against binutils' readelf (glibc keeps
a compatibility version under the same name, which a lookup by name alone may pick)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from agent.runtime import python as gil

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def cmd(*args: str) -> bytes:
    return b"\0".join(a.encode() for a in args) + b"\0"


@pytest.mark.parametrize(("cmdline", "want"), [
    (cmd("python3", "app.py"), True),
    (cmd("/usr/bin/python3.11", "-m", "http.server"), True),
    (cmd("/opt/venv/bin/python"), True),
    (cmd("python2.7"), True),
    (cmd("/usr/bin/pythonista"), False),
    (cmd("node", "python3"), False),
    (cmd("python3-config"), False),
    (b"", False),
])
def test_python_is_the_commands_first_word_by_the_node_agents_rule(cmdline: bytes, want: bool) -> None:
    assert gil.is_python(cmdline) is want


def test_the_c_libraries_a_process_maps_are_found_in_its_maps() -> None:
    maps = b"""\
55d0c0000000-55d0c0001000 r--p 00000000 fe:01 123 /usr/bin/python3.11
7f0000000000-7f0000028000 r--p 00000000 fe:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000028000-7f000019d000 r-xp 00028000 fe:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1000000000-7f1000001000 r-xp 00000000 fe:01 789 /lib/ld-musl-x86_64.so.1
7f2000000000-7f2000001000 r-xp 00000000 fe:01 790 /lib/x86_64-linux-gnu/libpthread.so.0
7f3000000000-7f3000001000 r-xp 00000000 fe:01 791 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f4000000000-7f4000001000 r-xp 00000000 fe:01 792 /tmp/mylibc.so.6 (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
"""
    assert gil.c_libraries(maps) == ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/ld-musl-x86_64.so.1",
                                     "/lib/x86_64-linux-gnu/libpthread.so.0"]
    own = gil.c_libraries(Path("/proc/self/maps").read_bytes())
    assert any(os.path.basename(p) == "libc.so.6" for p in own), own


def test_the_default_version_of_pthread_cond_timedwait_is_the_one_probed() -> None:
    out = subprocess.run(["readelf", "--dyn-syms", "-W", LIBC], capture_output=True, text=True, check=True).stdout
    versions = {m.group(2): int(m.group(1), 16)
                for m in re.finditer(r"^\s*\d+: ([0-9a-f]+)\s+\d+ FUNC\s+\w+\s+\w+\s+\d+ pthread_cond_timedwait(@@?\S+)$",
                                     out, re.M)}
    assert len(versions) == 2, versions  # glibc: the current symbol and a compatibility one
    default = next(a for v, a in versions.items() if v.startswith("@@"))
    compat = next(a for v, a in versions.items() if not v.startswith("@@"))
    fd = os.open(LIBC, os.O_RDONLY)
    try:
        got = gil.default_symbol_address(fd)
    finally:
        os.close(fd)
    assert got == default and got != compat


def test_a_file_without_the_symbol_has_no_address(tmp_path: Path) -> None:
    fd = os.open("/proc/self/exe", os.O_RDONLY)  # the interpreter: it imports the symbol, defines none
    try:
        assert gil.default_symbol_address(fd) is None
    finally:
        os.close(fd)
