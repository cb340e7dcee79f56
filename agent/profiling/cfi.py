"""Call frame information read straight from the bytes of `.eh_frame` or `.debug_frame`
(DWARF 5 section 6.4.1; the .eh_frame variant as in the Linux Standard Base, "Exception
Frames"), for agent/profiling/unwind.py: the entries (CIE and FDE) and their instructions,
decoded with `struct` and plain integer arithmetic.

pyelftools decodes the same through its generic parser, ~5x slower; this module gives the
same entries (its unit tests compare the tables built both ways row for row on this host's
binaries). What it does not handle raises CFIError, and the caller gives the file no table:
pointer encodings other than absolute and pc-relative (as pyelftools), an entry running past
its section, an unknown instruction.

An instruction is a tuple (opcode, *args) with pyelftools' opcodes and arguments: the three
primary opcodes with an operand in their low 6 bits (advance_loc 0x40, offset 0x80, restore
0xC0) carry it as their first argument, a block (an expression) is its bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

Instruction = tuple[Any, ...]  # (opcode, *args)

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_S16 = struct.Struct("<h")
_S32 = struct.Struct("<i")
_S64 = struct.Struct("<q")

# DW_EH_PE_* value formats: (struct, size) or None for LEB128
_FIXED = {0x00: _U64, 0x02: _U16, 0x03: _U32, 0x04: _U64, 0x0A: _S16, 0x0B: _S32, 0x0C: _S64}
_PCREL = 0x10
_OMIT = 0xFF

# opcodes by their operands (DW_CFA_*)
_NO_ARGS = frozenset((0x00, 0x0A, 0x0B, 0x2D))  # nop, remember/restore_state, AARCH64_negate_ra_state
_ULEB = frozenset((0x06, 0x07, 0x08, 0x0D, 0x0E, 0x2E))  # restore_ext, undefined, same_value, def_cfa_register,
# def_cfa_offset, GNU_args_size
_ULEB_ULEB = frozenset((0x05, 0x09, 0x0C, 0x14))  # offset_ext, register, def_cfa, val_offset
_ULEB_SLEB = frozenset((0x11, 0x12, 0x15))  # offset_ext_sf, def_cfa_sf, val_offset_sf
_ULEB_BLOCK = frozenset((0x10, 0x16))  # expression, val_expression


class CFIError(Exception):
    """The section has something this decoder does not follow."""


@dataclass
class CIE:
    offset: int
    code_alignment_factor: int
    data_alignment_factor: int
    return_address_register: int
    fde_encoding: int  # DW_EH_PE_*: absolute 8-byte addresses in .debug_frame
    lsda_encoding: int
    has_augmentation_data: bool  # "z": FDEs have an augmentation length
    instructions: list[Instruction]

    def __getitem__(self, key: str) -> int:  # as pyelftools' CIE header, for unwind._run
        return int(getattr(self, key))


@dataclass
class FDE:
    offset: int
    cie: CIE
    initial_location: int
    address_range: int
    instructions: list[Instruction]


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _sleb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            if b & 0x40:
                result -= 1 << shift
            return result, pos


def _pointer(data: bytes, pos: int, encoding: int, address: int, relative: bool) -> tuple[int, int]:
    """A value in DW_EH_PE `encoding` at `pos`; pc-relative ones made absolute (the field's
    address: section address + pos) when `relative`."""
    fmt = encoding & 0x0F
    mod = encoding & 0xF0
    s = _FIXED.get(fmt)
    if s is not None:
        value = s.unpack_from(data, pos)[0]
        end = pos + s.size
    elif fmt == 0x01:
        value, end = _uleb(data, pos)
    elif fmt == 0x09:
        value, end = _sleb(data, pos)
    else:
        raise CFIError(f"pointer format {encoding:#x}")
    if relative and mod == _PCREL:
        value += address + pos
    elif relative and mod != 0:
        raise CFIError(f"pointer encoding {encoding:#x}")
    return value, end


def instructions(data: bytes, pos: int, end: int) -> list[Instruction]:
    """The instructions of data[pos:end]. Addresses of set_loc are 8 bytes (x86-64)."""
    out: list[Instruction] = []
    uleb = _uleb
    while pos < end:
        raw = data[pos]
        pos += 1
        high = raw & 0xC0
        if high:
            low = raw & 0x3F
            if high == 0x80:  # offset: register, factored offset
                off, pos = uleb(data, pos)
                out.append((0x80, low, off))
            else:  # advance_loc (0x40), restore (0xC0)
                out.append((high, low))
        elif raw in _NO_ARGS:
            out.append((raw,))
        elif raw in _ULEB:
            a, pos = uleb(data, pos)
            out.append((raw, a))
        elif raw in _ULEB_ULEB:
            a, pos = uleb(data, pos)
            b, pos = uleb(data, pos)
            out.append((raw, a, b))
        elif raw in _ULEB_SLEB:
            a, pos = uleb(data, pos)
            b, pos = _sleb(data, pos)
            out.append((raw, a, b))
        elif raw == 0x02:  # advance_loc1
            out.append((raw, data[pos]))
            pos += 1
        elif raw == 0x03:  # advance_loc2
            out.append((raw, _U16.unpack_from(data, pos)[0]))
            pos += 2
        elif raw == 0x04:  # advance_loc4
            out.append((raw, _U32.unpack_from(data, pos)[0]))
            pos += 4
        elif raw == 0x01:  # set_loc
            out.append((raw, _U64.unpack_from(data, pos)[0]))
            pos += 8
        elif raw == 0x0F:  # def_cfa_expression: a block
            n, pos = uleb(data, pos)
            out.append((raw, data[pos:pos + n]))
            pos += n
        elif raw in _ULEB_BLOCK:
            a, pos = uleb(data, pos)
            n, pos = uleb(data, pos)
            out.append((raw, a, data[pos:pos + n]))
            pos += n
        elif raw == 0x13:  # def_cfa_offset_sf
            a, pos = _sleb(data, pos)
            out.append((raw, a))
        else:
            raise CFIError(f"unknown CFI opcode {raw:#04x}")
    if pos > end:
        raise CFIError("an instruction runs past its entry")
    return out


def entries(data: bytes, address: int, eh_frame: bool) -> list[FDE]:
    """The FDEs of a section's bytes (`address`: the section's address, for pc-relative
    pointers), each with its CIE, in the section's order."""
    size = len(data)
    cies: dict[int, CIE] = {}
    fdes: list[FDE] = []
    pos = 0
    try:
        while pos < size:
            start = pos
            length = _U32.unpack_from(data, pos)[0]
            pos += 4
            if length == 0 and eh_frame:  # a terminator
                continue
            wide = length == 0xFFFFFFFF
            if wide:
                length = _U64.unpack_from(data, pos)[0]
                pos += 8
            end = pos + length
            if end > size:
                raise CFIError(f"entry at {start:#x} runs past its section")
            id_pos = pos
            cie_id = (_U64 if wide else _U32).unpack_from(data, pos)[0]
            pos += 8 if wide else 4
            if eh_frame:
                is_cie = cie_id == 0
            else:
                is_cie = cie_id == (0xFFFFFFFFFFFFFFFF if wide else 0xFFFFFFFF)
            if is_cie:
                if start not in cies:
                    cies[start] = _cie(data, start, pos, end, eh_frame)
                pos = end
                continue
            cie_at = id_pos - cie_id if eh_frame else cie_id
            cie = cies.get(cie_at)
            if cie is None:
                cie = cies[cie_at] = _cie_at(data, cie_at, eh_frame)
            if eh_frame:
                if cie.fde_encoding == _OMIT:
                    raise CFIError("FDE address omitted")
                loc, pos = _pointer(data, pos, cie.fde_encoding, address, True)
                rng, pos = _pointer(data, pos, cie.fde_encoding & 0x0F, address, False)
            else:
                loc = _U64.unpack_from(data, pos)[0]
                rng = _U64.unpack_from(data, pos + 8)[0]
                pos += 16
            if cie.has_augmentation_data:
                n, pos = _uleb(data, pos)
                pos += n
            fdes.append(FDE(start, cie, loc, rng, instructions(data, pos, end)))
            pos = end
    except (IndexError, struct.error) as e:
        raise CFIError(f"truncated at {pos:#x}: {e}") from e
    return fdes


def _cie_at(data: bytes, start: int, eh_frame: bool) -> CIE:
    length = _U32.unpack_from(data, start)[0]
    pos = start + 4
    wide = length == 0xFFFFFFFF
    if wide:
        length = _U64.unpack_from(data, pos)[0]
        pos += 8
    end = pos + length
    pos += 8 if wide else 4
    if end > len(data):
        raise CFIError(f"CIE at {start:#x} runs past its section")
    return _cie(data, start, pos, end, eh_frame)


def _cie(data: bytes, start: int, pos: int, end: int, eh_frame: bool) -> CIE:
    """The CIE at `start`, its header from `pos` (after the CIE id) on."""
    version = data[pos]
    pos += 1
    nul = data.index(0, pos)
    aug = data[pos:nul].decode("ascii", "replace")
    pos = nul + 1
    if not eh_frame and version >= 4:
        pos += 2  # address_size, segment_selector_size
    caf, pos = _uleb(data, pos)
    daf, pos = _sleb(data, pos)
    if version == 1:
        ra = data[pos]
        pos += 1
    else:
        ra, pos = _uleb(data, pos)
    fde_enc = 0x00 if not eh_frame else _OMIT
    lsda_enc = _OMIT
    has_z = aug.startswith("z")
    if has_z:
        n, pos = _uleb(data, pos)
        aug_end = pos + n
        for ch in aug[1:]:
            if ch == "R":
                fde_enc = data[pos]
                pos += 1
            elif ch == "L":
                lsda_enc = data[pos]
                pos += 1
            elif ch == "P":
                enc = data[pos]
                _, pos = _pointer(data, pos + 1, enc & 0x7F, 0, False)  # indirect or not: only skipped
            elif ch in "SB":
                continue
            else:
                break  # unknown: the length skips the rest
        pos = aug_end
    elif aug:
        raise CFIError(f"augmentation {aug!r} without its length")
    if eh_frame and fde_enc == _OMIT:
        fde_enc = 0x00  # no "R": absolute addresses
    return CIE(start, caf, daf, ra, fde_enc, lsda_enc, has_z, instructions(data, pos, end))
