"""Node.js event-loop probes, the parts without a kernel: which processes are Node.js (the node
agent's rule), where libuv is (the maps of a process, the node binary), its functions' addresses
in a real file, and the switch."""

from __future__ import annotations

import os
import shutil

import pytest

from agent import config
from agent.runtime import nodejs
from tests.unit.nodeagent_families import FAMILIES


@pytest.mark.parametrize(("exe", "want"), [
    ("/usr/bin/node", True), ("/usr/bin/nodejs", True), ("/opt/node18", True), ("/usr/local/bin/node20.1", True),
    ("/usr/bin/node (deleted)", True), ("/usr/bin/python3", False), ("/usr/bin/nodemon-helper", False),
    ("/usr/bin/noded", False), ("", False),
])
def test_nodejs_is_the_executables_name_by_the_node_agents_rule(exe: str, want: bool) -> None:
    assert nodejs.is_nodejs(exe) is want


def test_the_libuv_files_a_process_maps_are_found_in_its_maps() -> None:
    maps = (b"55d0c0000000-55d0c1000000 r-xp 00000000 08:01 123 /usr/bin/node\n"
            b"7f0000000000-7f0000020000 r-xp 00000000 08:01 456 /usr/lib/x86_64-linux-gnu/libuv.so.1.0.0\n"
            b"7f0000020000-7f0000021000 r--p 00020000 08:01 456 /usr/lib/x86_64-linux-gnu/libuv.so.1.0.0\n"
            b"7f0000030000-7f0000040000 r-xp 00000000 08:01 789 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
            b"7f0000050000-7f0000060000 rw-p 00000000 00:00 0 \n"
            b"7f0000060000-7f0000070000 r-xp 00000000 08:01 999 /opt/app/not-libuv/x.so\n")
    assert nodejs.libuv_libraries(maps) == ["/usr/lib/x86_64-linux-gnu/libuv.so.1.0.0"]


def test_the_node_binarys_libuv_functions_are_found_in_its_symbol_table() -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.fail("no node: apt-get install nodejs (scripts/setup.sh installs it)")
    fd = os.open(os.path.realpath(node), os.O_RDONLY)
    try:
        got = nodejs.function_addresses(fd)
    finally:
        os.close(fd)
    libuv = "/usr/lib/x86_64-linux-gnu/libuv.so.1"
    if nodejs.POLL not in got and os.path.exists(libuv):  # a node that links the system libuv
        fd = os.open(libuv, os.O_RDONLY)
        try:
            got = nodejs.function_addresses(fd)
        finally:
            os.close(fd)
    assert set(got) == {nodejs.POLL, *nodejs.IO_CALLBACKS}, (
        f"{node}: no libuv symbols ({sorted(got)}): a stripped node or libuv is not measurable")
    assert all(a > 0 for a in got.values()) and len(set(got.values())) == len(got)


def test_a_file_without_libuv_has_no_addresses() -> None:
    fd = os.open("/bin/true", os.O_RDONLY)
    try:
        assert nodejs.function_addresses(fd) == {}
    finally:
        os.close(fd)


def test_the_metric_is_the_node_agents_counter_and_the_probes_are_off_by_default() -> None:
    assert FAMILIES["container_nodejs_event_loop_blocked_time_seconds_total"][0] == "counter"
    assert "nodejs" not in config.load({}, {}, None).probe_families
    assert "nodejs" in config.load({"nodejs_enabled": "true"}, {}, None).probe_families
    assert "nodejs" in config.load({}, {"ENABLE_NODEJS_MONITORING": "true"}, None).probe_families
