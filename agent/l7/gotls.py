"""Go crypto/tls in an executable: where `crypto/tls.(*Conn).Write` and `.Read` start and where
they return, read from the ELF file alone, for the uprobes of bpf/include/gotls.h.

- The Go version comes from the build info (`.go.buildinfo`, which every Go 1.13+ binary has,
  stripped or not), and with it the calling convention the probes read: the register ABI (Go
  1.17+ on amd64, 1.18+ on arm64: arguments, results and the goroutine in registers) or the
  older stack ABI (ABI0: arguments and results on the goroutine's stack, a Read keyed by its
  *tls.Conn; traced on amd64 only, STACK_ABI mirrors the offsets of gotls.h).
- The functions are found in `.symtab` when the binary has one, otherwise in `.gopclntab`, the
  runtime's own function table, which `-ldflags="-s -w"` keeps (the runtime needs it for stack
  traces). Its function table gives each function's entry and, from the next entry, its end.
- The returns are the function's RET instructions, found by disassembling it with capstone: Go
  moves goroutine stacks, so a uretprobe (which rewrites the return address on the stack) would
  corrupt the program; a uprobe on each RET reads the results there instead.
- The struct offsets the probes follow from a tls.Conn to its socket's fd are compiled into the
  probes (GO_TLS_* in gotls.h). They have been the same in every Go release since 1.17; the
  binary's DWARF, when present, is checked against them, and a binary that disagrees is not
  traced.

Pure functions of a file: no BPF here (agent/l7/tls.py attaches).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

WRITE = "crypto/tls.(*Conn).Write"
READ = "crypto/tls.(*Conn).Read"
MIN_VERSION = (1, 13)  # the first with build info (.go.buildinfo): older binaries are not recognised
REGISTER_ABI = {"x64": (1, 17), "arm64": (1, 18)}  # the first release with the register ABI
REGISTER, STACK = "register", "stack"
# The stack ABI, x64 (ABI0): words above the stack pointer at the entry of (*Conn).Write/Read and
# at each RET, the return address at 0. Mirrors GO_STACK_* in bpf/include/gotls.h.
STACK_ABI = {"receiver": 8, "buf": 16, "len": 24, "n": 40}

# The path bpf/include/gotls.h follows: (struct, member) -> offset. Mirrors GO_TLS_* there.
OFFSETS = {
    ("crypto/tls.Conn", "conn"): 0,    # its net.Conn (an interface: itab, then the data pointer)
    ("net.TCPConn", "conn"): 0,        # *net.TCPConn is the interface's data
    ("net.conn", "fd"): 0,             # *net.netFD
    ("net.netFD", "pfd"): 0,           # internal/poll.FD
    ("internal/poll.FD", "Sysfd"): 16,  # after fdmu (a fdMutex: uint64, uint32, uint32)
}

BUILDINFO_MAGIC = b"\xff Go buildinf:"
# .gopclntab header magics: Go 1.2-1.15, 1.16-1.17, 1.18-1.19, 1.20+
PCLN_12, PCLN_116, PCLN_118, PCLN_120 = 0xFFFFFFFB, 0xFFFFFFFA, 0xFFFFFFF0, 0xFFFFFFF1


class GoBinaryError(Exception):
    """Why a binary's Go TLS cannot be traced (not Go, too old, no such function, ...)."""


@dataclass
class Function:
    name: str
    entry: int  # virtual address
    size: int
    returns: list[int] = field(default_factory=list)  # virtual addresses of its RET instructions


@dataclass
class GoTls:
    """What the probes need of one binary."""

    version: str  # "go1.19.8"
    write: Function
    read: Function
    source: str  # where the functions were found: "symtab" or "pclntab"
    offsets_from: str  # "dwarf" (checked against the binary's own) or "table"
    arch: str = "x64"
    abi: str = REGISTER  # REGISTER or STACK: which programs of bpf/l7.c read the calls


def parse_version(v: str) -> tuple[int, int]:
    """(major, minor) of "go1.19.8", "go1.21rc2", "devel go1.22-abc Tue ...": (0, 0) if unreadable."""
    m = re.search(r"\bgo(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def abi_of(version: str, arch: str) -> str:
    """REGISTER or STACK: how a binary of Go `version` on `arch` passes arguments; GoBinaryError
    for what the probes cannot read."""
    v = parse_version(version)
    if v < MIN_VERSION:
        raise GoBinaryError(f"{version}: Go before 1.13 is not traced")
    abi = REGISTER if v >= REGISTER_ABI[arch] else STACK
    if abi == STACK and arch != "x64":
        raise GoBinaryError(f"{version} on {arch}: the stack ABI is traced on amd64 only")
    return abi


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise GoBinaryError("truncated build info")


def _read_at(elf: ELFFile, addr: int, size: int) -> bytes:
    """`size` bytes at virtual address `addr`, from the section that holds them."""
    for sec in elf.iter_sections():
        start = sec["sh_addr"]
        if start and start <= addr and addr + size <= start + sec["sh_size"] and sec["sh_type"] != "SHT_NOBITS":
            off = addr - start
            return bytes(sec.data()[off:off + size])
    raise GoBinaryError(f"address {addr:#x} is in no section")


def go_version(elf: ELFFile) -> str:
    """The Go version the binary was built with, from its build info."""
    sec = elf.get_section_by_name(".go.buildinfo")
    if sec is None:
        raise GoBinaryError("not a Go executable (no .go.buildinfo)")
    data = bytes(sec.data())
    if not data.startswith(BUILDINFO_MAGIC) or len(data) < 32:
        raise GoBinaryError("unreadable Go build info")
    ptr_size, flags = data[14], data[15]
    if flags & 2:  # Go 1.18+: the strings inline, each after its length
        n, pos = _uvarint(data, 32)
        return data[pos:pos + n].decode(errors="replace")
    # Go 1.13-1.17: a pointer to the version's string header (pointer, length)
    endian = ">" if flags & 1 else "<"
    fmt = endian + ("Q" if ptr_size == 8 else "I")
    (hdr,) = struct.unpack_from(fmt, data, 16)
    sptr, slen = struct.unpack(endian + ("QQ" if ptr_size == 8 else "II"), _read_at(elf, hdr, 2 * ptr_size))
    if slen > 64:
        raise GoBinaryError("unreadable Go build info")
    return _read_at(elf, sptr, slen).decode(errors="replace")


def _symtab_functions(elf: ELFFile, names: set[str]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        return out
    for sym in symtab.iter_symbols():  # type: ignore[attr-defined]
        if sym.name in names and sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"]:
            out[sym.name] = (sym["st_value"], sym["st_size"])
    return out


def pclntab_functions(data: bytes, names: set[str], text: int | None = None) -> dict[str, tuple[int, int]]:
    """Entry (virtual address) and size of the functions named, from a `.gopclntab` image.
    `text`: where the Go code starts when the header does not say (a position-independent
    executable's table holds 0 there, relocated at load time)."""
    if len(data) < 16:
        raise GoBinaryError("truncated .gopclntab")
    magic = struct.unpack_from("<I", data, 0)[0]
    if data[4:6] != b"\0\0" or data[7] not in (4, 8):
        raise GoBinaryError("unreadable .gopclntab header")
    ptr = data[7]
    word = "<Q" if ptr == 8 else "<I"

    def w(i: int) -> int:  # header word i (after the first 8 bytes)
        return int(struct.unpack_from(word, data, 8 + i * ptr)[0])

    out: dict[str, tuple[int, int]] = {}
    want = {n.encode() for n in names}
    if magic in (PCLN_118, PCLN_120):
        nfunc, nameoff, pcln = w(0), w(3), w(7)
        text = w(2) or text or 0
        entry_size = 8  # (entryoff uint32, funcoff uint32), relative to text and the table

        def entry(i: int) -> tuple[int, int]:
            e, f = struct.unpack_from("<II", data, pcln + i * entry_size)
            return text + e, f

        def fname(funcoff: int) -> bytes:
            (noff,) = struct.unpack_from("<i", data, pcln + funcoff + 4)
            return _cstring(data, nameoff + noff)
    elif magic == PCLN_116:
        nfunc, nameoff, pcln = w(0), w(2), w(6)
        entry_size = 2 * ptr

        def entry(i: int) -> tuple[int, int]:
            e, f = struct.unpack_from(word + word[1], data, pcln + i * entry_size)
            return int(e), int(f)

        def fname(funcoff: int) -> bytes:
            (noff,) = struct.unpack_from("<i", data, pcln + funcoff + ptr)
            return _cstring(data, nameoff + noff)
    elif magic == PCLN_12:
        nfunc, pcln = w(0), 8 + ptr
        entry_size = 2 * ptr

        def entry(i: int) -> tuple[int, int]:
            e, f = struct.unpack_from(word + word[1], data, pcln + i * entry_size)
            return int(e), int(f) - pcln  # funcoff is from the table's start: make it from pcln

        def fname(funcoff: int) -> bytes:
            (noff,) = struct.unpack_from("<i", data, pcln + funcoff + ptr)
            return _cstring(data, noff)
    else:
        raise GoBinaryError(f"unknown .gopclntab version {magic:#x}")
    if nfunc <= 0 or pcln + (nfunc + 1) * entry_size > len(data):
        raise GoBinaryError("truncated .gopclntab function table")
    for i in range(nfunc):
        start, funcoff = entry(i)
        name = fname(funcoff)
        if name in want:
            end, _ = entry(i + 1)  # the table ends with the end of the last function
            out[name.decode()] = (start, end - start)
            if len(out) == len(want):
                break
    return out


def _embedded_pclntab_functions(elf: ELFFile, names: set[str]) -> dict[str, tuple[int, int]]:
    """The functions from a function table without a section of its own: position-independent
    executables keep it in .data.rel.ro.gopclntab, or inside .data.rel.ro when externally
    linked (or .rodata), found by its
    header; its code start is then a load-time relocation, read from .rela.dyn."""
    ptr = 8 if elf.elfclass == 64 else 4
    quantum = {"EM_X86_64": 1, "EM_386": 1, "EM_AARCH64": 4}.get(elf["e_machine"], 1)
    for name in (".data.rel.ro.gopclntab", ".data.rel.ro", ".rodata"):
        sec = elf.get_section_by_name(name)
        if sec is None:
            continue
        data = bytes(sec.data())
        for magic in (PCLN_120, PCLN_118, PCLN_116):
            needle = struct.pack("<IBBBB", magic, 0, 0, quantum, ptr)
            pos = -1
            while (pos := data.find(needle, pos + 1)) >= 0:
                if pos % ptr:
                    continue
                text = _relocated(elf, sec["sh_addr"] + pos + 8 + 2 * ptr) if magic != PCLN_116 else None
                try:
                    found = pclntab_functions(data[pos:], names, text)
                except (GoBinaryError, struct.error, IndexError):
                    continue
                if found:
                    return found
    raise GoBinaryError("no .symtab functions and no Go function table (.gopclntab)")


def _relocated(elf: ELFFile, addr: int) -> int | None:
    """The value a RELATIVE relocation stores at `addr` when the program is loaded (its addend)."""
    sec = elf.get_section_by_name(".rela.dyn")
    if sec is None or elf.elfclass != 64:
        return None
    data = bytes(sec.data())
    needle = struct.pack("<Q", addr)
    pos = -1
    while (pos := data.find(needle, pos + 1)) >= 0:
        if pos % 24 == 0 and pos + 24 <= len(data):  # Elf64_Rela: offset, info, addend
            return int(struct.unpack_from("<q", data, pos + 16)[0])
    return None


def _cstring(data: bytes, off: int) -> bytes:
    end = data.find(b"\0", off, off + 4096)
    return data[off:end] if end >= 0 else b""


def returns(code: bytes, addr: int, arch: str = "x64") -> list[int]:
    """Addresses of the RET instructions in a function's code (at `addr`), by disassembly."""
    import capstone

    if arch == "x64":
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    elif arch == "arm64":
        md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    else:
        raise GoBinaryError(f"no disassembler for {arch}")
    out: list[int] = []
    end = addr
    for address, size, mnemonic, _ in md.disasm_lite(code, addr):
        if mnemonic == "ret":
            out.append(address)
        end = address + size
    if end != addr + len(code):
        # A RET past an undecodable byte would be missed: a call would then never end.
        raise GoBinaryError(f"disassembly stopped at {end:#x}, before the end of the function at {addr:#x}")
    return out


def _dwarf_members(elf: ELFFile) -> dict[tuple[str, str], int] | None:
    """The offsets of OFFSETS' members in the binary's DWARF; None without DWARF.

    Go writes type names inline (DW_FORM_string), so each struct's DIE is found by its name's
    bytes in .debug_info and only that DIE is decoded (walking the DWARF of a Go binary with
    pyelftools takes seconds)."""
    sec = elf.get_section_by_name(".debug_info") or elf.get_section_by_name(".zdebug_info")
    if sec is None:
        return None
    try:
        dwarf = elf.get_dwarf_info()
        info = _section_bytes(sec)
    except (ELFError, zlib.error, ValueError):
        return None
    out: dict[tuple[str, str], int] = {}
    for struct_name in {s for s, _ in OFFSETS}:
        needle = struct_name.encode() + b"\0"
        pos = 0
        while (pos := info.find(needle, pos + 1)) > 0:
            die_offset = pos - 1  # the DIE's abbreviation code (one byte in Go's DWARF), then its name
            try:
                cu = dwarf.get_CU_containing(die_offset)
                abbrev = cu.get_abbrev_table().get_abbrev(info[die_offset])
                if abbrev["tag"] != "DW_TAG_structure_type" or not abbrev["attr_spec"] \
                        or abbrev["attr_spec"][0]["name"] != "DW_AT_name":
                    continue  # the name's bytes inside another name ("*net.conn") or another DIE
                die = cu.get_DIE_from_refaddr(die_offset)
            except Exception:  # noqa: BLE001 - not a DIE after all
                continue
            name = die.attributes.get("DW_AT_name")
            if name is None or name.value != needle[:-1]:
                continue
            for child in die.iter_children():
                member = child.attributes.get("DW_AT_name")
                loc = child.attributes.get("DW_AT_data_member_location")
                if child.tag == "DW_TAG_member" and member is not None and loc is not None \
                        and isinstance(loc.value, int):
                    out[(struct_name, member.value.decode())] = loc.value
            break
    return out


def _section_bytes(sec: object) -> bytes:
    data = bytes(sec.data())  # type: ignore[attr-defined]
    # pyelftools decompresses SHF_COMPRESSED sections itself; old Go wrote .zdebug_* (ZLIB + size)
    if data.startswith(b"ZLIB") and len(data) > 12:
        return zlib.decompress(data[12:])
    return data


def inspect(f: BinaryIO) -> GoTls:
    """What the Go TLS probes need of the executable open in `f`; GoBinaryError says why not."""
    try:
        elf = ELFFile(f)
    except ELFError as e:
        raise GoBinaryError(f"not an ELF file: {e}") from e
    machine = elf["e_machine"]
    arch = {"EM_X86_64": "x64", "EM_AARCH64": "arm64"}.get(machine)
    if arch is None:
        raise GoBinaryError(f"unsupported architecture {machine}")
    version = go_version(elf)
    abi = abi_of(version, arch)
    names = {WRITE, READ}
    source = "symtab"
    found = _symtab_functions(elf, names)
    if len(found) < len(names):
        source = "pclntab"
        sec = elf.get_section_by_name(".gopclntab")
        if sec is not None:
            found = pclntab_functions(bytes(sec.data()), names)
        else:
            found = _embedded_pclntab_functions(elf, names)
    if READ not in found or WRITE not in found:
        raise GoBinaryError("no crypto/tls.(*Conn).Read/Write: the program does not use crypto/tls")
    funcs: dict[str, Function] = {}
    for name in (WRITE, READ):
        entry, size = found[name]
        if size <= 0 or size > 1 << 20:
            raise GoBinaryError(f"{name}: implausible size {size}")
        fn = Function(name, entry, size)
        fn.returns = returns(_read_at(elf, entry, size), entry, arch)
        funcs[name] = fn
    if not funcs[READ].returns:
        raise GoBinaryError(f"{READ}: no RET instruction found")
    members = _dwarf_members(elf)
    offsets_from = "table"
    if members:
        for key, want in OFFSETS.items():
            got = members.get(key)
            if got is not None and got != want:
                raise GoBinaryError(f"{version}: {key[0]}.{key[1]} is at {got}, the probes read {want}")
        if all(key in members for key in OFFSETS):
            offsets_from = "dwarf"
    return GoTls(version, funcs[WRITE], funcs[READ], source, offsets_from, arch, abi)


def inspect_path(path: str) -> GoTls:
    """inspect() of the file at `path`; OSError when it cannot be read (a process's exe that
    is gone: nothing is known of the file then)."""
    try:
        with open(path, "rb") as f:
            return inspect(f)
    except (struct.error, IndexError, UnicodeDecodeError, ELFError) as e:
        raise GoBinaryError(f"{path}: unreadable ({e})") from e
