"""Go crypto/tls discovery (agent/l7/gotls.py) on binaries built here with Debian's Go, checked
against the Go toolchain's own view of them (`go version -m`, `go tool objdump`), and the
attacher's Go path (agent/l7/tls.py) over a stand-in for the loaded programs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.ebpf.maps import AttachError, BpfMap, ProgramsClosing
from agent.l7 import gotls
from agent.l7 import tls as tls_mod
from tests.gobuild import go_build, go_env

WORKLOADS = Path(__file__).parent.parent / "system" / "workloads" / "gotls"
HELLO = 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("hello") }\n'


@dataclass
class Builds:
    client: Path
    stripped: Path
    hello: Path  # Go, without crypto/tls
    pie: Path  # position-independent: the function table in .data.rel.ro.gopclntab
    external: Path  # linked by gcc (cgo): the table inside .data.rel.ro, its code start relocated
    env: dict[str, str]


@pytest.fixture(scope="module")
def go(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    if shutil.which("go") is None:
        pytest.fail("these tests need Debian's golang-go (scripts/setup.sh installs it with the test packages)")
    work = tmp_path_factory.mktemp("gobuild")
    (work / "hello.go").write_text(HELLO)

    def build(src: Path, out: str, *flags: str, cgo: bool = False) -> Path:
        return Path(go_build(src, work / out, work, *flags, cgo=cgo))

    client = WORKLOADS / "client.go"
    return Builds(build(client, "client"), build(client, "client-stripped", "-ldflags=-s -w"),
                  build(work / "hello.go", "hello"), build(client, "client-pie", "-buildmode=pie"),
                  build(client, "client-ext", "-buildmode=pie", "-ldflags=-linkmode=external", cgo=True),
                  go_env(work))


def objdump_returns(b: Builds, binary: Path, func: str) -> list[int]:
    """RET addresses of `func` as the Go toolchain's own disassembler lists them."""
    out = subprocess.run(["go", "tool", "objdump", "-s", "^" + re.escape(func) + "$", str(binary)], env=b.env,
                         capture_output=True, text=True, check=True).stdout
    return [int(m.group(1), 16) for m in re.finditer(r"^\s+\S+\s+0x([0-9a-f]+)\s+c3\s+RET\b", out, re.M)]


def symtab(binary: Path) -> dict[str, tuple[int, int]]:
    with open(binary, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".symtab")
        assert sec is not None
        return {s.name: (s["st_value"], s["st_size"]) for s in sec.iter_symbols()  # type: ignore[attr-defined]
                if s.name in (gotls.READ, gotls.WRITE)}


def test_a_normal_build_from_symtab_with_dwarf_checked_offsets_and_the_toolchains_rets(go: Builds) -> None:
    found = gotls.inspect_path(str(go.client))
    version = subprocess.run(["go", "env", "GOVERSION"], env=go.env, capture_output=True, text=True,
                             check=True).stdout.strip()
    assert found.version == version and gotls.parse_version(version) >= (1, 17)
    assert (found.source, found.offsets_from, found.arch) == ("symtab", "dwarf", "x64")
    syms = symtab(go.client)
    for fn in (found.write, found.read):
        assert (fn.entry, fn.size) == syms[fn.name]
        assert fn.returns == objdump_returns(go, go.client, fn.name) and len(fn.returns) >= 2
        assert all(fn.entry < r < fn.entry + fn.size for r in fn.returns)


def test_a_stripped_build_from_pclntab(go: Builds) -> None:
    """(`go tool objdump` needs .symtab: the normal build's RETs, checked above, are the reference.)"""
    with open(go.stripped, "rb") as f:
        elf = ELFFile(f)
        assert elf.get_section_by_name(".symtab") is None and elf.get_section_by_name(".debug_info") is None
    found = gotls.inspect_path(str(go.stripped))
    normal = gotls.inspect_path(str(go.client))
    assert (found.source, found.offsets_from) == ("pclntab", "table")
    assert found.version == normal.version
    # -s -w drops symbols and DWARF only: the code is where it was. The function table's sizes
    # run to the next function (alignment padding included), .symtab's stop at the last byte.
    for fn, ref in ((found.write, normal.write), (found.read, normal.read)):
        assert fn.entry == ref.entry and fn.returns == ref.returns
        assert ref.size <= fn.size < ref.size + 64


def test_pclntab_agrees_with_symtab_on_every_function_asked(go: Builds) -> None:
    with open(go.client, "rb") as f:
        elf = ELFFile(f)
        sec = elf.get_section_by_name(".symtab")
        assert sec is not None
        funcs = {s.name: s["st_value"] for s in sec.iter_symbols()  # type: ignore[attr-defined]
                 if s["st_info"]["type"] == "STT_FUNC" and s.name.startswith(("crypto/tls.", "net/http.(*Client)"))}
        pcln = bytes(elf.get_section_by_name(".gopclntab").data())  # type: ignore[union-attr]
    assert len(funcs) > 100
    got = gotls.pclntab_functions(pcln, set(funcs))
    assert {name: entry for name, (entry, _) in got.items()} == funcs


@pytest.mark.parametrize("build", ["pie", "external"])
def test_position_independent_builds_function_table_without_its_section(go: Builds, build: str) -> None:
    binary = go.pie if build == "pie" else go.external
    names = {gotls.READ, gotls.WRITE}
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_DYN" and elf.get_section_by_name(".gopclntab") is None
        embedded = gotls._embedded_pclntab_functions(elf, names)
    syms = symtab(binary)
    assert {n: e for n, (e, _) in embedded.items()} == {n: e for n, (e, _) in syms.items()}
    found = gotls.inspect_path(str(binary))
    assert found.read.returns == objdump_returns(go, binary, gotls.READ)


def test_what_is_not_traced_says_why(go: Builds, tmp_path: Path) -> None:
    with pytest.raises(gotls.GoBinaryError, match="not a Go executable"):
        gotls.inspect_path(os.path.realpath(sys.executable))
    with pytest.raises(gotls.GoBinaryError, match="does not use crypto/tls"):
        gotls.inspect_path(str(go.hello))
    (tmp_path / "text").write_text("#!/bin/sh\n")
    with pytest.raises(gotls.GoBinaryError, match="not an ELF file"):
        gotls.inspect_path(str(tmp_path / "text"))
    with pytest.raises(OSError):
        gotls.inspect_path(str(tmp_path / "absent"))


def test_a_binary_whose_dwarf_disagrees_with_the_probes_offsets_is_refused(
        go: Builds, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(gotls.OFFSETS, ("internal/poll.FD", "Sysfd"), 24)
    with pytest.raises(gotls.GoBinaryError, match=r"internal/poll.FD.Sysfd is at 16, the probes read 24"):
        gotls.inspect_path(str(go.client))
    gotls.inspect_path(str(go.stripped))  # no DWARF: the table is trusted


def test_offsets_mirror_the_bpf_header() -> None:
    header = (Path(__file__).parent.parent.parent / "bpf" / "include" / "gotls.h").read_text()
    defines = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define (GO_TLS_\w+) (\d+)", header)}
    assert defines == {"GO_TLS_IFACE_DATA": 8, "GO_TLS_NETCONN_FD": gotls.OFFSETS[("net.conn", "fd")],
                       "GO_TLS_NETFD_SYSFD": gotls.OFFSETS[("internal/poll.FD", "Sysfd")]}
    assert gotls.OFFSETS[("crypto/tls.Conn", "conn")] == 0 and gotls.OFFSETS[("net.TCPConn", "conn")] == 0
    assert gotls.OFFSETS[("net.netFD", "pfd")] == 0


def test_stack_abi_offsets_mirror_the_bpf_header() -> None:
    header = (Path(__file__).parents[2] / "bpf" / "include" / "gotls.h").read_text()
    defines = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define (GO_STACK_\w+) (\d+)", header)}
    assert defines == {f"GO_STACK_{k.upper()}": v for k, v in
                       {"recv": gotls.STACK_ABI["receiver"], "buf": gotls.STACK_ABI["buf"],
                        "len": gotls.STACK_ABI["len"], "n": gotls.STACK_ABI["n"]}.items()}
    # ABI0 on amd64: the return address, then c, b (pointer, length, capacity), then n
    assert list(gotls.STACK_ABI.values()) == [8, 16, 24, 40]


@pytest.mark.parametrize(("version", "arch", "want"), [
    ("go1.19.8", "x64", gotls.REGISTER), ("go1.17", "x64", gotls.REGISTER), ("go1.16.15", "x64", gotls.STACK),
    ("go1.15.15", "x64", gotls.STACK), ("go1.13", "x64", gotls.STACK), ("go1.18", "arm64", gotls.REGISTER),
    ("go1.12.17", "x64", "Go before 1.13 is not traced"),
    ("go1.17.13", "arm64", "the stack ABI is traced on amd64 only"),
])
def test_abi_by_version_and_architecture(version: str, arch: str, want: str) -> None:
    if want in (gotls.REGISTER, gotls.STACK):
        assert gotls.abi_of(version, arch) == want
    else:
        with pytest.raises(gotls.GoBinaryError, match=want):
            gotls.abi_of(version, arch)


def test_returns_by_disassembly() -> None:
    # mov rbx, rax; ret; nop; ret 8; int3 (padding)
    code = b"\x48\x89\xc3\xc3\x90\xc2\x08\x00\xcc"
    assert gotls.returns(code, 0x1000) == [0x1003, 0x1005]
    # a byte that is no instruction in 64-bit mode (0x06, push es): a RET after it would be missed
    with pytest.raises(gotls.GoBinaryError, match="disassembly stopped at 0x1003"):
        gotls.returns(b"\x48\x89\xc3\x06\xc3", 0x1000)


@pytest.mark.parametrize(("text", "want"), [
    ("go1.19.8", (1, 19)), ("go1.17", (1, 17)), ("go1.21rc2", (1, 21)), ("go1.16.15", (1, 16)),
    ("devel go1.22-abcdef Tue Jan 2 15:04:05 2024 +0000", (1, 22)), ("weird", (0, 0)), ("go", (0, 0)),
])
def test_parse_version(text: str, want: tuple[int, int]) -> None:
    assert gotls.parse_version(text) == want


def synthetic_pclntab(magic: int, funcs: list[tuple[str, int]], end: int) -> bytes:
    """A .gopclntab of the Go 1.16 or 1.2 layout (amd64) with these (name, entry) functions."""
    import struct

    names = b""
    nameoffs = []
    for name, _ in funcs:
        nameoffs.append(len(names))
        names += name.encode() + b"\0"
    n = len(funcs)
    if magic == gotls.PCLN_116:
        header = 8 + 7 * 8
        nameoff = header
        pcln = nameoff + len(names)
        # (entry, funcoff) pairs, funcoff from the table's start; the _funcs follow the table
        table = b"".join(struct.pack("<QQ", e, 16 * (n + 1) + 16 * i) for i, (_, e) in enumerate(funcs))
        table += struct.pack("<QQ", end, 0)
        funcs_blob = b"".join(struct.pack("<Qi4x", e, nameoffs[i]) for i, (_, e) in enumerate(funcs))
        head = struct.pack("<IBBBBQQQQQQQ", magic, 0, 0, 1, 8, n, 0, nameoff, 0, 0, 0, pcln)
        return head + names + table + funcs_blob
    # Go 1.2: the table right after the header; _func offsets and names from the start
    table_at = 16
    funcs_at = table_at + 16 * (n + 1)
    names_at = funcs_at + 16 * n
    table = b"".join(struct.pack("<QQ", e, funcs_at + 16 * i) for i, (_, e) in enumerate(funcs))
    table += struct.pack("<QQ", end, 0)
    funcs_blob = b"".join(struct.pack("<Qi4x", e, names_at + nameoffs[i]) for i, (_, e) in enumerate(funcs))
    return struct.pack("<IBBBBQ", magic, 0, 0, 1, 8, n) + table + funcs_blob + names


@pytest.mark.parametrize("magic", [gotls.PCLN_116, gotls.PCLN_12], ids=["go1.16", "go1.2"])
def test_older_pclntab_layouts(magic: int) -> None:
    funcs = [("main.main", 0x401000), (gotls.WRITE, 0x401100), (gotls.READ, 0x401400)]
    data = synthetic_pclntab(magic, funcs, 0x401500)
    assert gotls.pclntab_functions(data, {gotls.READ, gotls.WRITE}) == {
        gotls.WRITE: (0x401100, 0x300), gotls.READ: (0x401400, 0x100)}
    with pytest.raises(gotls.GoBinaryError, match="unknown .gopclntab version"):
        gotls.pclntab_functions(b"\x01\x02\x03\x04" + data[4:], {gotls.READ})


# ----------------------------------------------------------------- attacher --

class Programs:
    """The loaded programs' uprobe calls, recorded; `fail_at`: the attach number that fails."""

    def __init__(self, fail_at: int = -1, closing: bool = False) -> None:
        self.attached: list[tuple[str, str, str, int | None]] = []
        self.calls = 0
        self.fail_at = fail_at
        self.closing = closing

    def map(self, name: str) -> BpfMap:
        raise KeyError(name)

    def attach_uprobe(self, path: str, symbol: str, fn_name: str, *, ret: bool = False,
                      addr: int | None = None) -> None:
        assert not ret, "no uretprobes on Go code"
        if self.closing:
            raise ProgramsClosing(symbol)
        self.calls += 1
        if self.calls == self.fail_at:
            raise AttachError(f"refused {fn_name}")
        self.attached.append((path, symbol, fn_name, addr))

    def detach_uprobe(self, path: str, symbol: str, *, ret: bool = False, addr: int | None = None) -> None:
        self.attached.remove(next(a for a in self.attached if a[0] == path and a[3] == addr))


def go_process(tmp_path: Path, pid: int, binary: Path) -> str:
    procfs = tmp_path / "proc"
    (procfs / str(pid)).mkdir(parents=True)
    (procfs / str(pid) / "exe").symlink_to(binary)
    (procfs / str(pid) / "maps").write_text("")
    return str(procfs)


def test_attacher_probes_write_read_and_each_ret_once_per_file(go: Builds, tmp_path: Path) -> None:
    procfs = go_process(tmp_path, 7, go.stripped)
    go_process(tmp_path, 8, go.stripped)  # the same file again
    go_process(tmp_path, 9, go.hello)  # Go without crypto/tls
    progs = Programs()
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [7, 8, 9])
    t.attach(progs)  # type: ignore[arg-type]
    want = gotls.inspect_path(str(go.stripped))
    st = os.stat(go.stripped)
    link = str(tmp_path / "links" / f"{st.st_dev}-{st.st_ino}")
    assert progs.attached == [
        (link, gotls.WRITE, "go_tls_write_enter", want.write.entry),
        (link, gotls.READ, "go_tls_read_enter", want.read.entry),
        *[(link, gotls.READ, "go_tls_read_return", r) for r in want.read.returns]]
    assert os.readlink(link) == f"{procfs}/7/exe"
    [binary] = t.go_binaries.values()
    assert (binary.path, binary.source, binary.probes) == (str(go.stripped), "pclntab", 2 + len(want.read.returns))
    assert "does not use crypto/tls" in t.go_skipped[(os.stat(go.hello).st_dev, os.stat(go.hello).st_ino)]
    t.scan([7, 8, 9])  # looked at once per file
    assert len(progs.attached) == 2 + len(want.read.returns) and progs.calls == len(progs.attached)


def test_attacher_puts_the_stack_abi_programs_on_an_older_go(
        go: Builds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A binary whose build info says Go 1.15 gets the stack-ABI programs (the real Go 1.15
    binaries are traced end to end by tests/system/test_l7_gotls_abi0.py)."""
    monkeypatch.setattr(gotls, "go_version", lambda elf: "go1.15.15")
    procfs = go_process(tmp_path, 7, go.stripped)
    progs = Programs()
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [7])
    t.attach(progs)  # type: ignore[arg-type]
    want = gotls.inspect_path(str(go.stripped))
    assert want.abi == gotls.STACK
    assert [fn for _, _, fn, _ in progs.attached] == [
        "go_tls_write_enter_stack", "go_tls_read_enter_stack", *["go_tls_read_return_stack"] * len(want.read.returns)]
    [found] = t.describe(7)
    assert found["attached"] and str(found["detail"]).startswith("Go crypto/tls (stack ABI): attached, go1.15.15")


def test_attacher_undoes_a_partial_attach_and_remembers_why(go: Builds, tmp_path: Path) -> None:
    procfs = go_process(tmp_path, 7, go.client)
    progs = Programs(fail_at=3)  # the first RET
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [7])
    t.attach(progs)  # type: ignore[arg-type]
    assert progs.attached == [] and t.go_binaries == {}
    [why] = t.go_skipped.values()
    assert "refused go_tls_read_return" in why


def test_attacher_bounds(go: Builds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    procfs = go_process(tmp_path, 7, go.client)
    monkeypatch.setattr(tls_mod, "MAX_GO_BINARIES", 0)
    monkeypatch.setattr(tls_mod, "MAX_SEEN", 2)
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [7])
    progs = Programs()
    t.attach(progs)  # type: ignore[arg-type]
    assert progs.attached == [] and list(t.go_skipped.values()) == ["already 0 Go executables traced"]
    for i in range(5):
        t._skip_go((0, i), "not a Go executable", "x")
    assert list(t.go_skipped) == [(0, 3), (0, 4)]  # the oldest forgotten first


def test_attacher_neither_attaches_nor_remembers_once_the_programs_close(go: Builds, tmp_path: Path) -> None:
    procfs = go_process(tmp_path, 7, go.client)
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [7])
    t.attach(Programs(closing=True))  # type: ignore[arg-type]
    assert t.go_binaries == {} and t.go_skipped == {}


def test_attacher_forgets_nothing_about_a_process_that_is_gone(go: Builds, tmp_path: Path) -> None:
    procfs = go_process(tmp_path, 7, go.client)
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [7, 99])
    progs = Programs()
    t.attach(progs)  # type: ignore[arg-type]  # pid 99 does not exist
    assert len(t.go_binaries) == 1 and t.go_skipped == {}
