"""TLS libraries linked into executables (agent/l7/tlsbin.py) on binaries built here: a C client
linked against Debian's libssl.a (OpenSSL inside), the same client linked against libssl.so
(imports only: nothing inside), and a stand-in for a rustls program (a crate named `rustls`
compiled by rustc in seconds, with legacy and v0 symbol mangling; a program on the real crate
takes minutes to build cold and is tested in tests/system/test_l7_rustls.py). Addresses
checked against `nm`.
Then what the attacher does with them (fake programs: no kernel) and what /api/processes and
`check` say per process."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import check
from agent.containers.registry import Process
from agent.ebpf.maps import AttachError
from agent.l7 import tls as tls_mod
from agent.l7 import tlsbin

WORKLOADS = Path(__file__).parents[1] / "system" / "workloads"
STANDIN = Path(__file__).parent / "native" / "rustls_standin.rs"


@dataclass
class Builds:
    static: Path
    shared: Path
    rustls: Path
    rustls_v0: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    work = tmp_path_factory.mktemp("tlsbin")
    src = str(WORKLOADS / "ssl_static_client.c")
    static, shared, rust = work / "static", work / "shared", work / "rustls-standin"
    subprocess.run(["gcc", "-O1", "-o", str(static), src, "-Wl,-Bstatic", "-lssl", "-lcrypto", "-Wl,-Bdynamic",
                    "-lpthread", "-ldl"], check=True, capture_output=True, timeout=120)
    subprocess.run(["gcc", "-O1", "-o", str(shared), src, "-lssl", "-lcrypto"], check=True, capture_output=True,
                   timeout=120)
    rustc = shutil.which("rustc", path="/usr/bin") or shutil.which("rustc")
    assert rustc is not None, "apt-get install rustc"
    subprocess.run([rustc, "--crate-name", "rustls", "-C", "opt-level=1", "-o", str(rust), str(STANDIN)],
                   check=True, capture_output=True, timeout=300)
    v0 = work / "rustls-standin-v0"
    subprocess.run([rustc, "--crate-name", "rustls", "-C", "opt-level=1", "-C", "symbol-mangling-version=v0",
                    "-o", str(v0), str(STANDIN)], check=True, capture_output=True, timeout=300)
    return Builds(static, shared, rust, v0)


def nm(path: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(path)], check=True, capture_output=True, text=True).stdout
    return {parts[2]: int(parts[0], 16) for line in out.splitlines() if len(parts := line.split()) == 3}


def test_openssl_linked_in_is_found_at_its_addresses(built: Builds) -> None:
    found = tlsbin.inspect_path(str(built.static))
    syms = nm(built.static)
    assert found.openssl == {s: syms[s] for s in tlsbin.OPENSSL} and found.static_openssl
    assert found.rustls == {} and found.tables[0] == ".symtab"


def test_imported_openssl_does_not_count(built: Builds) -> None:
    found = tlsbin.inspect_path(str(built.shared))
    assert found.openssl == {} and not found.static_openssl


def test_rustls_writer_and_reader_found_by_their_mangled_names(built: Builds) -> None:
    found = tlsbin.inspect_path(str(built.rustls))
    syms = nm(built.rustls)
    [write] = [a for s, a in syms.items() if "rustls..conn..Writer$u20$as$u20$std..io..Write$GT$5write17h" in s]
    [read] = [a for s, a in syms.items() if "rustls..conn..Reader$u20$as$u20$std..io..Read$GT$4read17h" in s]
    assert found.rustls == {"write": write, "read": read} and found.openssl == {}


def test_rustls_v0_mangled_writer_and_reader_found(built: Builds) -> None:
    found = tlsbin.inspect_path(str(built.rustls_v0))
    syms = nm(built.rustls_v0)
    # e.g. _RNvXNtCs..._6rustls4connNtB2_6WriterNtNtCs..._3std2io5Write5write
    [write] = [a for s, a in syms.items() if s.startswith("_RNvX") and "6rustls4conn" in s and "6Writer" in s
               and s.endswith("_3std2io5Write5write")]
    [read] = [a for s, a in syms.items() if s.startswith("_RNvX") and "6rustls4conn" in s and "6Reader" in s
              and s.endswith("_3std2io4Read4read")]
    assert found.rustls == {"write": write, "read": read} and found.openssl == {}
    # not the std adapters and drop glue that name the same types (write_fmt's Adapter<Writer>, ...)
    assert sum("6rustls4conn6Writer" in s for s in syms) > 1


def test_not_elf(tmp_path: Path) -> None:
    (tmp_path / "script").write_text("#!/bin/sh\n")
    with pytest.raises(tlsbin.NotElf):
        tlsbin.inspect_path(str(tmp_path / "script"))


class TgidMap:
    """The rustls_tgids map as the attacher uses it (BpfMap's key/leaf/set/delete)."""

    def __init__(self) -> None:
        self.tgids: set[int] = set()

    def key(self, tgid: int) -> int:
        return tgid

    def leaf(self, value: int) -> int:
        return value

    def set(self, key: int, value: int) -> bool:
        assert value == 1
        self.tgids.add(key)
        return True

    def delete(self, key: int) -> bool:
        self.tgids.discard(key)
        return True


class Programs:
    def __init__(self, refuse: str = "") -> None:
        self.attached: list[tuple[str, str, str, bool, int | None]] = []
        self.refuse = refuse
        self.rustls_tgids = TgidMap()

    def map(self, name: str) -> TgidMap:
        assert name == "rustls_tgids"
        return self.rustls_tgids

    def attach_uprobe(self, path: str, symbol: str, fn_name: str, *, ret: bool = False,
                      addr: int | None = None) -> None:
        if self.refuse:
            raise AttachError(f"uprobe {fn_name} on {path}:{symbol}: {self.refuse}")
        self.attached.append((path, symbol, fn_name, ret, addr))

    def detach_uprobe(self, path: str, symbol: str, *, ret: bool = False, addr: int | None = None) -> None:
        raise AssertionError("nothing to detach")


def procfs_with(tmp_path: Path, exes: dict[int, Path]) -> str:
    procfs = tmp_path / "proc"
    for pid, exe in exes.items():
        (procfs / str(pid)).mkdir(parents=True)
        (procfs / str(pid) / "exe").symlink_to(exe)
        (procfs / str(pid) / "maps").write_text("")
        (procfs / str(pid) / "comm").write_text(f"{exe.name}\n")
    return str(procfs)


def test_attacher_probes_openssl_linked_in_once_per_file_and_describes_each_process(
        built: Builds, tmp_path: Path) -> None:
    procfs = procfs_with(tmp_path, {7: built.static, 8: built.static, 9: built.rustls, 10: built.shared})
    progs = Programs()
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [7, 8, 9, 10])
    t.attach(progs)  # type: ignore[arg-type]
    st = os.stat(built.static)
    link = str(tmp_path / "links" / f"{st.st_dev}-{st.st_ino}")
    addrs = tlsbin.inspect_path(str(built.static)).openssl
    rst = os.stat(built.rustls)
    rlink = str(tmp_path / "links" / f"{rst.st_dev}-{rst.st_ino}")
    raddrs = tlsbin.inspect_path(str(built.rustls)).rustls
    assert progs.attached == [(link, sym, f"{prefix}_{end}", end == "exit", addrs[sym])
                              for sym, prefix in tls_mod.SYMBOLS for end in ("enter", "exit")] + [
        (rlink, f"rustls_{name}", f"rustls_{name}_{end}", end == "exit", raddrs[name])
        for name in ("write", "read") for end in ("enter", "exit")]
    attached = {"library": "openssl-static", "path": str(built.static), "attached": True, "detail": "8 uprobes"}
    assert t.describe(7) == t.describe(8) == [attached]
    assert t.describe(9) == [{"library": "rustls", "path": str(built.rustls), "attached": True,
                              "detail": "rustls Writer::write and Reader::read found (read, write) in .symtab/.dynsym: "
                                        "4 uprobes"}]
    assert progs.rustls_tgids.tgids == {9}  # its socket reads leave their fd for Reader::read
    assert t.describe(10) == []  # imports libssl, maps none here: nothing
    assert t.describe(11) is None  # never looked at
    t.on_process("removed", Process(pid=7, start_ticks=1, comm="static", cgroup_path="/", container_id=None, opt_out=frozenset()))
    t.on_process("removed", Process(pid=9, start_ticks=1, comm="rustls", cgroup_path="/", container_id=None, opt_out=frozenset()))
    assert t.describe(7) is None and t.describe(8) == [attached] and progs.rustls_tgids.tgids == set()
    assert len(t.static_ssl) == 1 and len(t.rustls) == 1


def test_attacher_says_why_not_limit_and_refusal(built: Builds, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    procfs = procfs_with(tmp_path, {7: built.static})
    monkeypatch.setattr(tls_mod, "MAX_STATIC_SSL", 0)
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [7])
    progs = Programs()
    t.attach(progs)  # type: ignore[arg-type]
    assert progs.attached == [] and t.describe(7) == [{
        "library": "openssl-static", "path": str(built.static), "attached": False,
        "detail": "not traced: already 0 executables with OpenSSL linked in traced"}]
    monkeypatch.setattr(tls_mod, "MAX_STATIC_SSL", 1)
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [7])
    t.attach(Programs(refuse="Invalid argument"))  # type: ignore[arg-type]
    [found] = t.describe(7) or []
    assert found["attached"] is False and t.static_ssl == {}
    assert str(found["detail"]).startswith("not traced: attach refused: uprobe ssl_write_enter on ")
    assert str(found["detail"]).endswith(":SSL_write: Invalid argument")


def test_rustls_attacher_says_why_not_limit_and_refusal(built: Builds, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    procfs = procfs_with(tmp_path, {9: built.rustls})
    monkeypatch.setattr(tls_mod, "MAX_RUSTLS", 0)
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [9])
    progs = Programs()
    t.attach(progs)  # type: ignore[arg-type]
    [found] = t.describe(9) or []
    assert progs.attached == [] and found["attached"] is False and progs.rustls_tgids.tgids == set()
    assert str(found["detail"]).endswith("; not traced: already 0 executables with rustls traced")
    monkeypatch.setattr(tls_mod, "MAX_RUSTLS", 1)
    t = tls_mod.TlsAttacher(procfs=procfs, link_dir=str(tmp_path / "links"), pids=lambda: [9])
    refusing = Programs(refuse="Invalid argument")
    t.attach(refusing)  # type: ignore[arg-type]
    [found] = t.describe(9) or []
    assert found["attached"] is False and t.rustls == {} and refusing.rustls_tgids.tgids == set()
    assert "; not traced: attach refused: uprobe rustls_write_enter on " in str(found["detail"])


def test_check_lists_the_processes_with_tls_and_why_not(built: Builds, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    procfs = procfs_with(tmp_path, {7: built.static, 9: built.rustls, 10: built.shared})
    rows = check.tls_rows(Programs(), procfs)  # type: ignore[arg-type]
    assert [(r.name, r.status) for r in rows] == [("  tls: processes", check.OK), ("  tls: 7 static", check.OK),
                                                  ("  tls: 9 rustls-standin", check.OK)]
    assert rows[0].detail == "3 looked at, 2 use TLS libraries the agent knows, 2 of them fully traced"
    assert rows[1].detail == f"openssl-static {built.static}: 8 uprobes"
    assert rows[2].detail == (f"rustls {built.rustls}: rustls Writer::write and Reader::read found (read, write) "
                              "in .symtab/.dynsym: 4 uprobes")
    rows = check.tls_rows(Programs(refuse="Invalid argument"), procfs)  # type: ignore[arg-type]
    assert [(r.name, r.status) for r in rows][1:] == [("  tls: 7 static", check.WARN),
                                                      ("  tls: 9 rustls-standin", check.WARN)]
    monkeypatch.setattr(check, "TLS_ROWS", 1)
    rows = check.tls_rows(Programs(), procfs)  # type: ignore[arg-type]
    assert len(rows) == 2 and rows[0].detail.endswith("2 of them fully traced (1 not listed)")
