"""TLS libraries linked into executables (agent/l7/tlsbin.py) on binaries built here: a C client
linked against Debian's libssl.a (OpenSSL inside), the same client linked against libssl.so
(imports only: nothing inside), and a stand-in for a rustls program (a crate named `rustls`
compiled by rustc: the real crate cannot be fetched here). Addresses checked against `nm`.
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
    return Builds(static, shared, rust)


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


def test_not_elf(tmp_path: Path) -> None:
    (tmp_path / "script").write_text("#!/bin/sh\n")
    with pytest.raises(tlsbin.NotElf):
        tlsbin.inspect_path(str(tmp_path / "script"))


class Programs:
    def __init__(self, refuse: str = "") -> None:
        self.attached: list[tuple[str, str, str, bool, int | None]] = []
        self.refuse = refuse

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
    assert progs.attached == [(link, sym, f"{prefix}_{end}", end == "exit", addrs[sym])
                              for sym, prefix in tls_mod.SYMBOLS for end in ("enter", "exit")]
    attached = {"library": "openssl-static", "path": str(built.static), "attached": True, "detail": "8 uprobes"}
    assert t.describe(7) == t.describe(8) == [attached]
    [rust] = t.describe(9) or []
    assert (rust["library"], rust["attached"]) == ("rustls", False)
    assert "not traced: the agent has no rustls probes yet" in str(rust["detail"])
    assert t.describe(10) == []  # imports libssl, maps none here: nothing
    assert t.describe(11) is None  # never looked at
    t.on_process("removed", Process(pid=7, start_ticks=1, comm="static", cgroup_path="/", container_id=None, opt_out=frozenset()))
    assert t.describe(7) is None and t.describe(8) == [attached]
    assert len(t.static_ssl) == 1


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


def test_check_lists_the_processes_with_tls_and_why_not(built: Builds, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    procfs = procfs_with(tmp_path, {7: built.static, 9: built.rustls, 10: built.shared})
    rows = check.tls_rows(Programs(), procfs)  # type: ignore[arg-type]
    assert [(r.name, r.status) for r in rows] == [("  tls: processes", check.OK), ("  tls: 7 static", check.OK),
                                                  ("  tls: 9 rustls-standin", check.WARN)]
    assert rows[0].detail == "3 looked at, 2 use TLS libraries the agent knows, 1 of them fully traced"
    assert rows[1].detail == f"openssl-static {built.static}: 8 uprobes"
    assert rows[2].detail.startswith(f"rustls {built.rustls}: rustls Writer::write and Reader::read found")
    monkeypatch.setattr(check, "TLS_ROWS", 1)
    rows = check.tls_rows(Programs(), procfs)  # type: ignore[arg-type]
    assert len(rows) == 2 and rows[0].detail.endswith("1 of them fully traced (1 not listed)")
