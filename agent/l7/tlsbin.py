"""TLS libraries linked into an executable, found from its symbols (no BPF here: agent/l7/tls.py
attaches):

- OpenSSL or BoringSSL linked statically (Node.js builds that bundle OpenSSL, Envoy, a C
  program linked against libssl.a): the executable itself defines SSL_write and SSL_read (and
  OpenSSL 1.1.1+'s _ex variants) in `.symtab` or `.dynsym`. Their addresses are handed to the
  same uprobes as a shared libssl's. A symbol the executable only imports (undefined: it comes
  from a libssl.so the process maps) does not count.
- rustls: the mangled `<rustls::conn::Writer as std::io::Write>::write` and
  `<rustls::conn::Reader as std::io::Read>::read`, in Rust's legacy mangling (rustc's default)
  or v0 (`-C symbol-mangling-version=v0`). rustls does no I/O of its own: bpf/include/rustls.h
  says how their plaintext is joined to the program's socket calls. Tested on a real rustls
  program built here with Debian's rustls crate (tests/rustbuild.py) and, for the mangling
  forms, on a stand-in crate named `rustls` with the same module path (tests/unit/test_tlsbin.py).

The string tables are searched for the names' bytes first, so a binary without them costs one
read of its symbol string tables; only the symbol entries whose name is at one of the offsets
found are decoded.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

OPENSSL = ("SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex")
# Legacy-mangled Rust names (rustls 0.20-0.23 keep Writer and Reader in rustls::conn, some
# releases one module deeper): the writer and the reader's path inside the mangled name.
RUSTLS_WRITE = re.compile(rb"_ZN[0-9]+_\$LT\$rustls\.\.conn\.\.(?:[a-z_]+\.\.)?Writer\$u20\$as\$u20\$std\.\.io\.\.Write\$GT\$5write17h[0-9a-f]{16}E\x00")
RUSTLS_READ = re.compile(rb"_ZN[0-9]+_\$LT\$rustls\.\.conn\.\.(?:[a-z_]+\.\.)?Reader\$u20\$as\$u20\$std\.\.io\.\.Read\$GT\$4read17h[0-9a-f]{16}E\x00")
# v0 mangling: an impl (`_RNvX`) in rustls::conn (or a module under it) of std::io::Write for
# Writer, its function `write` (and Read/Reader/read); the crates' hashes vary.
RUSTLS_WRITE_V0 = re.compile(rb"_RNvX[0-9A-Za-z_]*?6rustls4conn(?:[0-9A-Za-z_]*?)6WriterNtNtCs[0-9A-Za-z]+_3std2io5Write5write\x00")
RUSTLS_READ_V0 = re.compile(rb"_RNvX[0-9A-Za-z_]*?6rustls4conn(?:[0-9A-Za-z_]*?)6ReaderNtNtCs[0-9A-Za-z]+_3std2io4Read4read\x00")
SHN_UNDEF = 0
STT_FUNC = 2
MAX_STRTAB = 256 << 20  # a larger symbol string table is not read (bounded memory per look)


class NotElf(Exception):
    """The file is not an ELF executable this module can read."""


@dataclass
class Linked:
    """What TLS code an executable defines itself: symbol name -> virtual address."""

    openssl: dict[str, int] = field(default_factory=dict)
    rustls: dict[str, int] = field(default_factory=dict)  # "write", "read" -> address
    tables: list[str] = field(default_factory=list)  # the symbol tables read (".symtab", ".dynsym")

    @property
    def static_openssl(self) -> bool:
        """SSL_write and SSL_read both defined: the probes can pair requests and responses."""
        return "SSL_write" in self.openssl and "SSL_read" in self.openssl


def _offsets(strtab: bytes, name: bytes) -> set[int]:
    """Offsets in a string table where the string `name` starts (also as another's tail)."""
    needle = name + b"\0"
    out: set[int] = set()
    pos = -1
    while (pos := strtab.find(needle, pos + 1)) >= 0:
        out.add(pos)
    return out


def _pattern_offsets(strtab: bytes, pattern: re.Pattern[bytes]) -> set[int]:
    return {m.start() for m in pattern.finditer(strtab)}


def _defined(elf: ELFFile, symtab: object, wanted: dict[int, str]) -> dict[str, int]:
    """The defined functions among the symbols whose name offset is in `wanted` (offset -> key)."""
    out: dict[str, int] = {}
    if not wanted:
        return out
    is64 = elf.elfclass == 64
    endian = "<" if elf.little_endian else ">"
    fmt = endian + ("IBBHQQ" if is64 else "IIIBBH")
    entsize = struct.calcsize(fmt)
    data = bytes(symtab.data())  # type: ignore[attr-defined]
    for entry in struct.iter_unpack(fmt, data[:len(data) - len(data) % entsize]):
        if is64:
            name, info, _other, shndx, value, _size = entry
        else:
            name, value, _size, info, _other, shndx = entry
        key = wanted.get(name)
        if key is None or shndx == SHN_UNDEF or not value or (info & 0xF) != STT_FUNC:
            continue
        out.setdefault(key, value)
    return out


def inspect(f: BinaryIO) -> Linked:
    """The TLS functions the ELF executable open in `f` defines; NotElf when it is none."""
    try:
        elf = ELFFile(f)
    except ELFError as e:
        raise NotElf(str(e)) from e
    found = Linked()
    for table in (".symtab", ".dynsym"):
        symtab = elf.get_section_by_name(table)
        if symtab is None or symtab["sh_type"] == "SHT_NOBITS":
            continue
        strtab = elf.get_section(symtab["sh_link"])
        if strtab["sh_size"] > MAX_STRTAB:
            continue
        found.tables.append(table)
        names = bytes(strtab.data())
        wanted: dict[int, str] = {}
        for sym in OPENSSL:
            if sym not in found.openssl:
                wanted.update((off, sym) for off in _offsets(names, sym.encode()))
        rust: dict[int, str] = {}
        if b"rustls..conn" in names:
            rust.update((off, "write") for off in _pattern_offsets(names, RUSTLS_WRITE))
            rust.update((off, "read") for off in _pattern_offsets(names, RUSTLS_READ))
        if b"6rustls4conn" in names:
            rust.update((off, "write") for off in _pattern_offsets(names, RUSTLS_WRITE_V0))
            rust.update((off, "read") for off in _pattern_offsets(names, RUSTLS_READ_V0))
        for key, addr in _defined(elf, symtab, wanted).items():
            found.openssl.setdefault(key, addr)
        for key, addr in _defined(elf, symtab, rust).items():
            found.rustls.setdefault(key, addr)
    return found


def inspect_path(path: str) -> Linked:
    """inspect() of the file at `path`; OSError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return inspect(f)
    except (struct.error, IndexError, UnicodeDecodeError, ELFError) as e:
        raise NotElf(f"{path}: unreadable ({e})") from e
