"""The direct CFI decoder (agent/profiling/cfi.py) against pyelftools' on real binaries of this
machine, entry for entry and instruction for instruction, and the tables built from each row
for row; then packed sections for what those binaries do not have."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from agent.profiling import cfi
from agent.profiling.unwind import TableError, _pyelftools_entries, build

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
PYTHON = os.path.realpath("/usr/bin/python3")
LD = os.path.realpath("/lib64/ld-linux-x86-64.so.2")


def _sections(path: str) -> list[list[cfi.FDE]]:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        out = []
        for n, name in enumerate((".eh_frame", ".debug_frame")):
            s = elf.get_section_by_name(name)
            out.append(cfi.entries(s.data(), s["sh_addr"], n == 0) if s is not None else [])
        ref = _pyelftools_entries(elf)
    return [out, ref]


def _same(ours: list[list[cfi.FDE]], ref: list[list[cfi.FDE]]) -> None:
    assert [len(x) for x in ours] == [len(x) for x in ref]
    for a_list, b_list in zip(ours, ref, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            assert (a.offset, a.initial_location, a.address_range) == (b.offset, b.initial_location, b.address_range)
            assert a.instructions == b.instructions, hex(a.offset)
            assert a.cie.offset == b.cie.offset and a.cie.instructions == b.cie.instructions
            assert (a.cie.code_alignment_factor, a.cie.data_alignment_factor, a.cie.return_address_register) == (
                b.cie.code_alignment_factor, b.cie.data_alignment_factor, b.cie.return_address_register)


@pytest.mark.parametrize("path", [LIBC, PYTHON, LD])
def test_entries_and_rows_equal_pyelftools(path: str) -> None:
    ours, ref = _sections(path)
    assert len(ours[0]) > 100
    _same([ours[0], ours[1]], ref)
    fast, slow = build(path), build(path, decoder="pyelftools")
    assert fast.rows == slow.rows and fast.fdes == slow.fdes and len(fast) > 1000


def test_debug_frame_equals_pyelftools(tmp_path: Path) -> None:
    """.debug_frame (no .eh_frame: gcc -g -fno-asynchronous-unwind-tables): absolute addresses,
    CIE ids of all ones, CIE pointers from the section's start."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / "f.c"
    src.write_text("int g(int);\n__attribute__((noinline)) int f(int x) { volatile int a[40] = {x}; return g(a[0]) + a[39]; }\n"
                   "int g(int x) { return x * 3; }\nint main(int c, char **v) { return f(c); }\n")
    out = str(tmp_path / "f")
    subprocess.run(["gcc", "-O2", "-g", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables", "-o", out,
                    str(src)], check=True)
    ours, ref = _sections(out)
    assert len(ours[1]) >= 3  # f, g, main at least
    _same(ours, ref)
    assert build(out).rows == build(out, decoder="pyelftools").rows


def test_leb128() -> None:
    assert cfi._uleb(bytes([0xE5, 0x8E, 0x26]), 0) == (624485, 3)
    assert cfi._sleb(bytes([0xC0, 0xBB, 0x78]), 0) == (-123456, 3)
    assert cfi._sleb(bytes([0x7F]), 0) == (-1, 1)
    assert cfi._sleb(bytes([0x3F]), 0) == (63, 1)


def _eh_frame(fde_insns: bytes, cie_insns: bytes = b"\x0c\x07\x08\x90\x01", pc: int = 0x1000,
              size: int = 0x40, address: int = 0x2000) -> tuple[bytes, int]:
    """A CIE ("zR", pc-relative sdata4) and one FDE for [pc, pc + size), then a terminator."""
    cie_body = struct.pack("<I", 0) + b"\x01zR\x00" + b"\x01\x78\x10" + b"\x01\x1b" + cie_insns
    cie = struct.pack("<I", len(cie_body)) + cie_body
    fde_start = len(cie)
    field = fde_start + 8  # the initial location's offset in the section
    body = struct.pack("<I", fde_start + 4) + struct.pack("<iI", pc - (address + field), size) + b"\x00" + fde_insns
    return cie + struct.pack("<I", len(body)) + body + struct.pack("<I", 0), address


def test_a_packed_section() -> None:
    # advance_loc 4; def_cfa_offset 16; offset rbp, 2 (cfa-16); advance_loc1 10; def_cfa_register rbp;
    # remember_state; advance_loc 1; def_cfa rsp, 8; restore_state; def_cfa_expression [0x77 0x08];
    # def_cfa_offset_sf -2; offset_extended_sf 16, -1; GNU_args_size 0; nop
    insns = bytes([0x44, 0x0E, 0x10, 0x86, 0x02, 0x02, 0x0A, 0x0D, 0x06, 0x0A, 0x41, 0x0C, 0x07, 0x08, 0x0B,
                   0x0F, 0x02, 0x77, 0x08, 0x13, 0x7E, 0x11, 0x10, 0x7F, 0x2E, 0x00, 0x00])
    data, address = _eh_frame(insns)
    (fde,) = cfi.entries(data, address, True)
    assert (fde.initial_location, fde.address_range) == (0x1000, 0x40)
    assert fde.cie.code_alignment_factor == 1 and fde.cie.data_alignment_factor == -8
    assert fde.cie.return_address_register == 16 and fde.cie.fde_encoding == 0x1B
    assert fde.cie.instructions == [(0x0C, 7, 8), (0x80, 16, 1)]
    assert fde.instructions == [(0x40, 4), (0x0E, 16), (0x80, 6, 2), (0x02, 10), (0x0D, 6), (0x0A,), (0x40, 1),
                                (0x0C, 7, 8), (0x0B,), (0x0F, b"\x77\x08"), (0x13, -2), (0x11, 16, -1), (0x2E, 0),
                                (0x00,)]


def test_what_it_does_not_follow_raises() -> None:
    data, address = _eh_frame(bytes([0x44, 0x3F]))  # 0x3f: no such opcode
    with pytest.raises(cfi.CFIError, match="opcode"):
        cfi.entries(data, address, True)
    data, address = _eh_frame(bytes([0x44]))
    with pytest.raises(cfi.CFIError, match="past"):
        cfi.entries(data[:-10], address, True)  # the FDE cut short
    with pytest.raises(cfi.CFIError):
        cfi.entries(data[:30] + b"\x02", address, True)  # cut inside an entry's fields
    bad = bytearray(_eh_frame(b"")[0])
    bad[bad.index(b"\x1b")] = 0x3B  # datarel | sdata4: not followed
    with pytest.raises(cfi.CFIError, match="encoding"):
        cfi.entries(bytes(bad), address, True)


def test_a_bad_section_gives_no_table(tmp_path: Path) -> None:
    """A file whose .eh_frame the decoder refuses gets TableError (counted by the caller)."""
    src = Path(LIBC).read_bytes()
    from elftools.elf.elffile import ELFFile

    with open(LIBC, "rb") as f:
        s = ELFFile(f).get_section_by_name(".eh_frame")
        off = s["sh_offset"]
    broken = bytearray(src)
    broken[off:off + 4] = struct.pack("<I", 0x7FFFFFF0)  # the first entry runs past the section
    p = tmp_path / "libc-broken.so"
    p.write_bytes(bytes(broken))
    with pytest.raises(TableError, match="past"):
        build(str(p))
