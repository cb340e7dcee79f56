"""Compact unwind tables for x86-64 code without frame pointers, from a file's call frame
information (`.eh_frame`, and `.debug_frame` where it covers what `.eh_frame` does not).

The DWARF CFI of a function (DWARF 5, section 6.4) is a program: its CIE's initial
instructions then its FDE's, each advancing the location or changing a rule. Interpreted, it
gives per address range the rule for the canonical frame address (CFA: the caller's stack
pointer, the value rsp had before the call) and where each register the caller expects back
is saved. The kernel's unwinder (bpf/include/unwind.h) needs three things per range, packed
in one 8-byte row:

- the CFA: rsp + offset or rbp + offset (`RSP`, `RBP`; offsets in 8-byte words, < 512 KiB), or the expression every PLT section
  carries (`PLT`: rsp + 8, + 8 more past the stub's push); any other rule gives `NONE`, where
  the kernel falls back to frame pointers;
- where the caller's rbp is: at CFA + a small negative offset, or unchanged (0: any rule but
  "saved at CFA + offset" is taken as unchanged);
- the return address: at CFA - 8 on x86-64 (a rule saying otherwise gives `NONE`), or undefined
  (`END`: the outermost frame, _start and thread entry points say so).

Rows are sorted by address, each valid up to the next; the end of a function's range is a
`NONE` row unless the next function starts there, and a row equal to the one before is left
out. Addresses are the file's virtual addresses (the kernel subtracts the mapping's load
bias); a file whose code lies above 4 GiB, or that has more than `max_rows` rows, gets no
table (the caller counts it); one with more than `max_rows` * 8 bytes of CFI is not read at
all (it would have more rows: python3.11's 410 KB give 64,574; a 31 MB .eh_frame held the
table builder for minutes). Only reads the file.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

from agent.profiling import cfi

log = logging.getLogger(__name__)

# CFA rule types (bpf/include/unwind.h UNWIND_*)
NONE, RSP, RBP, PLT, END = 0, 1, 2, 3, 4
TYPE_NAMES = {NONE: "none", RSP: "rsp", RBP: "rbp", PLT: "plt", END: "end"}

# DWARF register numbers on x86-64 (System V psABI, figure 3.36)
REG_RBP, REG_RSP, REG_RA = 6, 7, 16

MAX_ROWS = 1 << 18  # per file: the kernel's binary search takes 19 steps at most
# pc, type, rbp's offset from the CFA (0: unchanged), the CFA's offset from rsp or rbp; both
# offsets in 8-byte words (a rule with an offset that is not a multiple of 8 gives NONE)
ROW = struct.Struct("<IBbH")

# The CFA expression of every .plt/.plt.sec section GCC and binutils emit for x86-64:
# DW_OP_breg7 (rsp) 8; DW_OP_breg16 (rip) 0; DW_OP_lit15; DW_OP_and; DW_OP_lit11 (or lit10);
# DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus
_PLT_PREFIX = bytes([0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A])


@dataclass(frozen=True)
class Row:
    pc: int
    type: int
    cfa_offset: int = 0
    rbp_offset: int = 0  # from the CFA; 0: rbp unchanged

    def __str__(self) -> str:
        rbp = f"rbp=c{self.rbp_offset:+d}" if self.rbp_offset else "rbp=u"
        return f"{self.pc:#x} cfa={TYPE_NAMES[self.type]}+{self.cfa_offset} {rbp}"


@dataclass
class UnwindTable:
    """A file's rows, packed as the kernel reads them (ROW each)."""

    rows: bytes
    fdes: int
    build_seconds: float
    cfi_bytes: int  # size of the sections read
    segments: tuple[tuple[int, int, int], ...] = ()  # (p_offset, p_filesz, p_vaddr) of PT_LOAD

    def bias(self, map_start: int, map_offset: int) -> int | None:
        """Address in a process - address in the file, for the mapping of the file at
        `map_offset` to `map_start`; None when no loadable segment holds that offset."""
        for off, size, vaddr in self.segments:
            if off <= map_offset < off + max(size, 1):
                return map_start - map_offset + off - vaddr
        return None

    def __len__(self) -> int:
        return len(self.rows) // ROW.size

    def row(self, i: int) -> Row:
        pc, t, rbp, cfa = ROW.unpack_from(self.rows, i * ROW.size)
        return Row(pc, t, cfa * 8, rbp * 8)

    def find(self, pc: int) -> Row | None:
        """The row in effect at `pc` (the kernel's binary search, for tests)."""
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if ROW.unpack_from(self.rows, mid * ROW.size)[0] <= pc:
                lo = mid + 1
            else:
                hi = mid
        return self.row(lo - 1) if lo else None


class TableError(Exception):
    """The file has no usable unwind table; the message says why."""


def _rule(cfa: tuple[int, int] | bytes | None, regs: dict[int, tuple[str, int]]) -> tuple[int, int, int]:
    """(type, CFA offset, rbp offset) of a state."""
    ra = regs.get(REG_RA)
    if ra is not None and ra[0] == "undefined":
        return END, 0, 0
    if ra is not None and ra != ("offset", -8):
        return NONE, 0, 0
    if isinstance(cfa, bytes):
        return (PLT, 8, 0) if cfa.startswith(_PLT_PREFIX) else (NONE, 0, 0)
    if cfa is None or cfa[0] not in (REG_RSP, REG_RBP) or not 0 <= cfa[1] < 8 << 16 or cfa[1] % 8:
        return NONE, 0, 0
    rbp = 0
    saved = regs.get(REG_RBP)
    if saved is not None and saved[0] == "offset" and -128 * 8 <= saved[1] < 0 and saved[1] % 8 == 0:
        rbp = saved[1]
    return (RSP if cfa[0] == REG_RSP else RBP), cfa[1], rbp


_RULES: dict[tuple[Any, Any, Any], tuple[int, int, int]] = {}  # _rule's results, by what they depend on


def _rule_of(cfa: tuple[int, int] | bytes | None, regs: dict[int, tuple[str, int]]) -> tuple[int, int, int]:
    key = (cfa, regs.get(REG_RA), regs.get(REG_RBP))
    r = _RULES.get(key)
    if r is None:
        if len(_RULES) > 4096:
            _RULES.clear()
        r = _RULES[key] = _rule(cfa, regs)
    return r


def _run(instructions: list[tuple[Any, ...]], cie: Any, pc: int, cfa: tuple[int, int] | bytes | None,
         regs: dict[int, tuple[str, int]], initial: dict[int, tuple[str, int]] | None,
         out: list[tuple[int, int, int, int]] | None) -> tuple[tuple[int, int] | bytes | None, dict[int, tuple[str, int]]]:
    """Execute CFA instructions ((opcode, *args) as agent/profiling/cfi.py decodes them) from
    state (pc, cfa, regs); each row in effect from a location on is appended to `out` as (pc,
    type, cfa offset, rbp offset)."""
    caf = cie["code_alignment_factor"]
    daf = cie["data_alignment_factor"]
    stack: list[tuple[tuple[int, int] | bytes | None, dict[int, tuple[str, int]]]] = []
    regs = dict(regs)
    for ins in instructions:
        op = ins[0]  # the commonest first
        if op == 0x40 or op == 0x02 or op == 0x03 or op == 0x04:  # advance_loc, advance_loc1/2/4
            if out is not None:
                out.append((pc, *_rule_of(cfa, regs)))
            pc += ins[1] * caf
        elif op == 0x0E:  # def_cfa_offset
            cfa = (cfa[0], ins[1]) if isinstance(cfa, tuple) else None
        elif op == 0x80 or op == 0x05 or op == 0x11:  # offset, offset_extended, offset_extended_sf
            regs[ins[1]] = ("offset", ins[2] * daf)
        elif op == 0x01:  # set_loc
            if out is not None:
                out.append((pc, *_rule_of(cfa, regs)))
            pc = ins[1]
        elif op == 0x0C:  # def_cfa
            cfa = (ins[1], ins[2])
        elif op == 0x12:  # def_cfa_sf
            cfa = (ins[1], ins[2] * daf)
        elif op == 0x0D:  # def_cfa_register
            cfa = (ins[1], cfa[1] if isinstance(cfa, tuple) else 0)
        elif op == 0x13:  # def_cfa_offset_sf
            cfa = (cfa[0], ins[1] * daf) if isinstance(cfa, tuple) else None
        elif op == 0x0F:  # def_cfa_expression
            cfa = bytes(ins[1])
        elif op == 0x07:  # undefined
            regs[ins[1]] = ("undefined", 0)
        elif op == 0x08:  # same_value
            regs.pop(ins[1], None)
        elif op in (0x09, 0x10, 0x16, 0x14, 0x15):  # register, expression, val_*: not followed
            regs[ins[1]] = ("other", 0)
        elif op == 0xC0 or op == 0x06:  # restore, restore_extended
            if initial is not None and ins[1] in initial:
                regs[ins[1]] = initial[ins[1]]
            else:
                regs.pop(ins[1], None)
        elif op == 0x0A:  # remember_state
            stack.append((cfa, dict(regs)))
        elif op == 0x0B:  # restore_state
            if stack:
                cfa, regs = stack.pop()
        # nop (0x00), GNU_args_size (0x2e), others: no change to the rules we keep
    if out is not None:
        out.append((pc, *_rule_of(cfa, regs)))
    return cfa, regs


def build(path: str, max_rows: int = MAX_ROWS, decoder: str = "bytes") -> UnwindTable:
    """The unwind table of the ELF file at `path`; TableError when it has none we can use.
    `decoder`: "bytes" (agent/profiling/cfi.py) or "pyelftools" (its reference, for tests)."""
    from elftools.common.exceptions import ELFError

    t0 = time.monotonic()
    try:
        with open(path, "rb") as f:
            from elftools.elf.elffile import ELFFile

            elf = ELFFile(f)
            segments = tuple((s["p_offset"], s["p_filesz"], s["p_vaddr"]) for s in elf.iter_segments()
                             if s["p_type"] == "PT_LOAD")
            if elf["e_machine"] != "EM_X86_64":
                raise TableError(f"{path}: {elf['e_machine']}, not x86-64")
            sections = [elf.get_section_by_name(n) for n in (".eh_frame", ".debug_frame")]
            sizes = sum(s.data_size for s in sections if s is not None)
            if sizes > max_rows * ROW.size:  # ~6 bytes of CFI a row: more rows than max_rows
                raise TableError(f"{path}: {sizes} bytes of call frame information, too big (rows, more than "
                                 f"{max_rows} expected)")
            if decoder == "pyelftools":
                sources = _pyelftools_entries(elf)
            else:
                sources = [cfi.entries(s.data(), s["sh_addr"], n == 0) for n, s in enumerate(sections)
                           if s is not None and s["sh_type"] != "SHT_NOBITS" and s.data_size]
                if sections[0] is None or sections[0]["sh_type"] == "SHT_NOBITS" or not sections[0].data_size:
                    sources.insert(0, [])  # the second source is .debug_frame's
            rows: list[tuple[int, int, int, int]] = []
            covered: list[tuple[int, int]] = []
            fdes = 0
            cie_states: dict[tuple[int, int], tuple[tuple[int, int] | bytes | None, dict[int, tuple[str, int]]]] = {}
            for n, entries in enumerate(sources):
                seen = sorted(covered)
                for e in entries:
                    start, size = e.initial_location, e.address_range
                    if size <= 0:
                        continue
                    if n and _overlaps(seen, start, start + size):
                        continue  # .debug_frame for what .eh_frame has
                    cie = e.cie
                    state = cie_states.get((n, cie.offset))  # offsets in their own section
                    if state is None:
                        state = cie_states[(n, cie.offset)] = _run(cie.instructions, cie, 0, None, {}, None, None)
                    fde_rows: list[tuple[int, int, int, int]] = []
                    _run(e.instructions, cie, start, state[0], state[1], state[1], fde_rows)
                    rows.extend(r for r in fde_rows if start <= r[0] < start + size)
                    rows.append((start + size, NONE, 0, -1))  # the end: rbp -1 marks it for _pack
                    covered.append((start, start + size))
                    fdes += 1
    except (OSError, ELFError, ValueError, KeyError, AssertionError, AttributeError, TypeError, IndexError,
            cfi.CFIError) as e:
        raise TableError(f"{path}: {e}") from e
    if not rows:
        raise TableError(f"{path}: no call frame information")
    packed = _pack(rows, max_rows, path)
    return UnwindTable(packed, fdes, time.monotonic() - t0, sizes, segments)


def _pyelftools_entries(elf: Any) -> list[list[cfi.FDE]]:
    """.eh_frame's FDEs, then .debug_frame's, decoded by pyelftools (the reference of cfi.py)."""
    from elftools.dwarf.callframe import CIE, FDE

    dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False, follow_links=False)
    sources = [dwarf.EH_CFI_entries() if dwarf.has_EH_CFI() else [], dwarf.CFI_entries() if dwarf.has_CFI() else []]
    out: list[list[cfi.FDE]] = []
    for entries in sources:
        cies: dict[int, cfi.CIE] = {}
        fdes = []
        for e in entries:
            if not isinstance(e, FDE) or e.cie is None or isinstance(e, CIE):
                continue
            c = e.cie
            if c.offset not in cies:
                h = c.header
                cies[c.offset] = cfi.CIE(c.offset, h["code_alignment_factor"], h["data_alignment_factor"],
                                         h["return_address_register"], 0, 0, False, _tuples(c.instructions))
            fdes.append(cfi.FDE(e.offset, cies[c.offset], e["initial_location"], e["address_range"],
                                _tuples(e.instructions)))
        out.append(fdes)
    return out


def _tuples(instructions: list[Any]) -> list[tuple[Any, ...]]:
    return [(i.opcode, *(bytes(a) if isinstance(a, list) else a for a in i.args)) for i in instructions]


def _overlaps(sorted_ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    import bisect

    i = bisect.bisect_right(sorted_ranges, (start, 1 << 64)) - 1
    return (i >= 0 and sorted_ranges[i][1] > start) or (i + 1 < len(sorted_ranges) and sorted_ranges[i + 1][0] < end)


def _pack(rows: list[tuple[int, int, int, int]], max_rows: int, path: str) -> bytes:
    # By address, a function's end row (NONE, appended with priority 0 below) before the rows of
    # a function that starts there; at one address the last row wins: the next function's first
    # row over the end row, and the latest state of several advances of 0.
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0], _is_real(rows[i]), i))
    buf = bytearray()
    last: tuple[int, int, int] | None = None
    picked: list[tuple[int, int, int, int]] = []
    for j, i in enumerate(order):
        if j + 1 < len(order) and rows[order[j + 1]][0] == rows[i][0]:
            continue
        picked.append(rows[i])
    for pc, t, cfa, rbp in picked:
        if pc > 0xFFFFFFFF:
            raise TableError(f"{path}: code above 4 GiB ({pc:#x})")
        if t == NONE:
            cfa = rbp = 0
        rule = (t, cfa, rbp)
        if rule == last:
            continue
        buf += ROW.pack(pc, t, rbp // 8, cfa // 8)
        last = rule
    if len(buf) // ROW.size > max_rows:
        raise TableError(f"{path}: {len(buf) // ROW.size} rows, more than {max_rows}")
    return bytes(buf)


def _is_real(row: tuple[int, int, int, int]) -> int:
    return 0 if row[3] == -1 else 1
