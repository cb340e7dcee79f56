"""The unwind-table builder (agent/profiling/unwind.py) against real binaries of this machine:
every row binutils' `readelf --debug-dump=frames-interp` prints for libc and python3.11 must
give the same CFA rule, saved-rbp place and return-address rule at that address."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.profiling import unwind
from agent.profiling.unwind import END, NONE, PLT, RBP, RSP, Row, TableError, build

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
PYTHON = os.path.realpath("/usr/bin/python3")

needs_readelf = pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils' readelf is not installed")

_FDE = re.compile(r"^[0-9a-f]+ [0-9a-f]+ [0-9a-f]+ FDE cie=[0-9a-f]+ pc=([0-9a-f]+)\.\.([0-9a-f]+)")


def readelf_rows(path: str) -> list[tuple[int, int, int, str, str, str]]:
    """(pc, FDE start, FDE end, CFA, rbp, ra) for each row readelf interprets in .eh_frame."""
    # readelf exits 1 on these files without saying why (it printed every table): not checked
    out = subprocess.run(["readelf", "--debug-dump=frames-interp", path], check=False, capture_output=True,
                         text=True).stdout
    rows = []
    cols: list[str] = []
    fde: tuple[int, int] | None = None
    section = ""
    for line in out.splitlines():
        if line.startswith("Contents of the "):
            section = line.split()[3]
            fde = None
            continue
        if section != ".eh_frame":
            continue
        if " CIE " in line:
            fde = None
            continue
        m = _FDE.match(line)
        if m:
            fde = (int(m.group(1), 16), int(m.group(2), 16))
            cols = []
            continue
        parts = []
        for tok in line.split():
            if tok.startswith("(") and parts:  # "r10 (r10)": a register rule names its register
                parts[-1] += " " + tok
            else:
                parts.append(tok)
        if not parts or fde is None:
            continue
        if parts[0] == "LOC":
            cols = parts
            continue
        if cols and re.fullmatch(r"[0-9a-f]{16}", parts[0]):
            regs = dict(zip(cols, parts, strict=False))
            rows.append((int(parts[0], 16), fde[0], fde[1], regs["CFA"], regs.get("rbp", "u"), regs.get("ra", "u")))
    return rows


def expected(cfa: str, rbp: str, ra: str) -> tuple[int, int, int]:
    """readelf's rule as (type, CFA offset, rbp offset)."""
    if ra == "u":
        return END, 0, 0
    if ra != "c-8":
        return NONE, 0, 0
    if cfa == "exp":
        return PLT, 8, 0  # the PLT's expression; the signal trampoline's has ra "exp" too
    m = re.fullmatch(r"(rsp|rbp)\+(\d+)", cfa)
    if not m or int(m.group(2)) % 8:
        return NONE, 0, 0
    off = 0
    r = re.fullmatch(r"c(-\d+)", rbp)
    if r:
        off = int(r.group(1))
    return (RSP if m.group(1) == "rsp" else RBP), int(m.group(2)), off


@needs_readelf
@pytest.mark.parametrize("path", [LIBC, PYTHON])
def test_every_readelf_row_matches(path: str) -> None:
    table = build(path)
    rows = readelf_rows(path)
    assert len(rows) > 10_000, len(rows)
    mismatches = []
    for pc, _start, _end, cfa, rbp, ra in rows:
        got = table.find(pc)
        want = expected(cfa, rbp, ra)
        if got is None or (got.type, got.cfa_offset, got.rbp_offset) != want:
            mismatches.append((hex(pc), cfa, rbp, ra, str(got)))
    assert not mismatches, (len(mismatches), mismatches[:10])


@needs_readelf
def test_known_libc_functions() -> None:
    """qsort and memcpy's rows, by hand from readelf (Debian 12's libc 2.36)."""
    table = build(LIBC)
    syms = subprocess.run(["nm", "-D", "--defined-only", LIBC], check=True, capture_output=True, text=True).stdout
    addr = {p[2].split("@")[0]: int(p[0], 16) for p in (line.split() for line in syms.splitlines()) if len(p) == 3}
    by_fde: dict[int, list[tuple[int, int, int, str, str, str]]] = {}
    for r in readelf_rows(LIBC):
        by_fde.setdefault(r[1], []).append(r)
    checked = 0
    for fn in ("qsort", "qsort_r", "malloc", "write", "pthread_create", "memcpy", "printf"):
        a = addr[fn]
        # at a function's entry the CFA is rsp + 8 (the return address just pushed)
        got = table.find(a)  # (the row may start before: the function before ends the same way)
        assert got is not None and (got.type, got.cfa_offset, got.rbp_offset) == (RSP, 8, 0), (fn, str(got))
        for pc, _, _end, cfa, rbp, ra in by_fde.get(a, []):  # its prologue's and epilogue's rows
            got = table.find(pc)
            assert got is not None and (got.type, got.cfa_offset, got.rbp_offset) == expected(cfa, rbp, ra), (fn, hex(pc))
            checked += 1
    assert checked >= 10, checked


def test_between_functions_there_is_no_row(tmp_path: Path) -> None:
    """Past the end of a function that no other follows: NONE (the kernel falls back to frame
    pointers), as before the first function."""
    table = build(LIBC)
    first = table.row(0)
    assert table.find(first.pc - 1) is None
    nones = [table.row(i) for i in range(len(table)) if table.row(i).type == NONE]
    assert nones and all(r.cfa_offset == 0 and r.rbp_offset == 0 for r in nones)


def test_the_plt_expression_is_recognised() -> None:
    """libc's .plt has a CFA expression; the kernel evaluates it as the PLT rule."""
    table = build(LIBC)
    assert any(table.row(i).type == PLT for i in range(len(table)))


def test_python_main_binary_has_its_eval_loop() -> None:
    syms = subprocess.run(["nm", "--defined-only", PYTHON], capture_output=True, text=True).stdout
    if "_PyEval_EvalFrameDefault" not in syms:
        syms = subprocess.run(["nm", "-D", "--defined-only", PYTHON], check=True, capture_output=True, text=True).stdout
    a = next(int(p[0], 16) for p in (line.split() for line in syms.splitlines())
             if len(p) == 3 and p[2] == "_PyEval_EvalFrameDefault")
    table = build(PYTHON)
    row = table.find(a + 64)  # inside its prologue's pushes or past them: an rsp rule
    assert row is not None and row.type == RSP and row.cfa_offset >= 16, str(row)


def test_rows_are_sorted_and_packed() -> None:
    table = build(LIBC)
    pcs = [table.row(i).pc for i in range(len(table))]
    assert pcs == sorted(set(pcs))
    assert len(table.rows) == 8 * len(table)


def test_a_file_without_cfi_or_not_elf(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"not an elf file")
    with pytest.raises(TableError):
        build(str(p))
    with pytest.raises(TableError):
        build(str(tmp_path / "missing"))


def test_the_row_cap_refuses_a_file() -> None:
    # libc: 153,296 bytes of .eh_frame, ~28,000 rows: read, then refused for its rows
    with pytest.raises(TableError, match=r"\d+ rows, more than 20000"):
        build(LIBC, max_rows=20000)


def test_too_much_cfi_is_refused_unread() -> None:
    """A file with more CFI than max_rows rows could come from is not parsed at all (a 31 MB
    .eh_frame held the builder for minutes)."""
    with pytest.raises(TableError, match=r"\d+ bytes of call frame information, too big"):
        build(LIBC, max_rows=1000)  # its 153,296 bytes > 8,000


def test_gcc_debug_frame_only(tmp_path: Path) -> None:
    """A binary whose CFI is only in .debug_frame (-fno-asynchronous-unwind-tables -g): rows
    from there."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / "f.c"
    src.write_text("__attribute__((noinline)) int f(int *a, int n) { int s = 0; for (int i = 0; i < n; i++) "
                   "s += a[i] * a[n - 1 - i]; return s; }\nint main(void) { int a[64] = {1}; return f(a, 64); }\n")
    out = tmp_path / "f"
    subprocess.run(["gcc", "-O2", "-g", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables",
                    "-fno-unwind-tables", "-o", str(out), str(src)], check=True)
    sections = subprocess.run(["readelf", "-S", str(out)], check=True, capture_output=True, text=True).stdout
    assert ".debug_frame" in sections
    table = build(str(out))
    syms = subprocess.run(["nm", str(out)], check=True, capture_output=True, text=True).stdout
    f = next(int(p[0], 16) for p in (line.split() for line in syms.splitlines()) if len(p) == 3 and p[2] == "f")
    assert table.find(f) == Row(f, RSP, 8, 0)


def test_module_constants_match_the_kernel_header() -> None:
    header = (Path(__file__).resolve().parents[2] / "bpf" / "include" / "unwind.h").read_text()
    for name, value in (("NONE", NONE), ("RSP", RSP), ("RBP", RBP), ("PLT", PLT), ("END", END)):
        assert re.search(rf"#define UNWIND_{name} {value}\b", header), name
    assert re.search(rf"#define CA_UNWIND_SEARCH {unwind.MAX_ROWS.bit_length()}\b", header)
