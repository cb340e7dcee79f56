"""MySQL/MariaDB client/server protocol: every packet is a 3-byte little-endian payload length, a
sequence number, then the payload. A command (sequence 0) starts with its code; the answer's
packets follow with sequence 1, 2, ...

Requests, as the node agent counts them: COM_QUERY (its text), COM_STMT_PREPARE (its text; the
answer's PREPARE_OK gives the statement id, remembered per connection, bounded) and
COM_STMT_EXECUTE (the statement id: the text it was prepared with). COM_STMT_CLOSE has no
answer and is not a request (the kernel's detector, bpf/include/l7/mysql.h, does not recognise
it, so nothing waits for an answer that never comes). The kernel hands over a client's whole
packet, or the payload alone as a server reads it after the 4-byte header.

Status from the answer's first packet: ERR (0xff) "failed", with the error code as the span's
message; OK, EOF and a result set "ok"; a header without its payload "ok" (as the node agent);
anything else "unknown". Statements are stored with literals masked (mask_sql_literals)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from agent.l7 import contract
from agent.l7 import protocol as p
from agent.l7.sql import mask_literals

COM_QUERY, COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_STMT_CLOSE = 0x03, 0x16, 0x17, 0x19
OK, EOF, ERR = 0x00, 0xFE, 0xFF
METHODS = {COM_QUERY: "query", COM_STMT_PREPARE: "prepare", COM_STMT_EXECUTE: "execute"}
TRUNCATED = "..."  # after a statement the capture cut (as the node agent shows it)
# prepared statements remembered, over all connections (LRU); the texts are interned, so many
# connections preparing the same statement keep it once
MAX_STATEMENTS = 16384
_TEXT_CONTROL = frozenset(range(0x20)) - {0x09, 0x0A, 0x0D} | {0x7F}
TEXT_CHECKED = 16  # a payload read alone: its first bytes after the command must be text
_QUERY_ATTRIBUTES = b"\x00\x01"  # a MySQL 8 client's COM_QUERY prefix: no attributes, one set


@dataclass(frozen=True)
class Command:
    code: int  # COM_QUERY, COM_STMT_PREPARE or COM_STMT_EXECUTE
    text: str = ""  # the statement as sent (not masked): query and prepare
    truncated: bool = False  # the capture ends before the statement does
    statement_id: int = -1  # execute


@dataclass(frozen=True)
class Answer:
    status: str  # ok | failed | unknown
    code: int = 0  # an ERR packet's error code
    sqlstate: str = ""
    statement_id: int = -1  # a PREPARE_OK's


def _le24(b: bytes) -> int:
    return b[0] | b[1] << 8 | b[2] << 16


def _text(data: bytes) -> bool:
    return not any(c in _TEXT_CONTROL for c in data)


def _command(payload: bytes, length: int) -> Command | None:
    """The request in a command payload of `length` bytes (-1: unknown, a server's read) whose
    first bytes are `payload`."""
    if not payload:
        return None
    code = payload[0]
    if code == COM_STMT_EXECUTE:
        if len(payload) < 10 or payload[6:10] != b"\x01\x00\x00\x00":
            return None
        return Command(code, statement_id=int.from_bytes(payload[1:5], "little"))
    if code not in (COM_QUERY, COM_STMT_PREPARE) or len(payload) < 2:
        return None
    attributes = code == COM_QUERY and len(payload) >= 4 and payload[1:3] == _QUERY_ATTRIBUTES
    if length < 0 and not _text(payload[3 if attributes else 1:TEXT_CHECKED]):  # as the kernel checks it
        return None
    raw = payload[3 if attributes else 1:length if length >= 0 else None]
    if not raw:
        return None
    truncated = length >= 0 and len(payload) < length
    return Command(code, raw.decode("utf-8", errors="replace"), truncated)


def parse_command(data: bytes) -> Command | None:
    """The request in a call's first bytes: a whole packet (a client's write; its length says
    it is one) or its payload alone (a server's read after the header, whose first bytes must
    be a statement's text); None when it is not one. Never raises."""
    try:
        if len(data) >= 5 and data[3] == 0 and data[4] in METHODS:
            length = _le24(data)
            if length >= 1 and length + 4 >= len(data):
                cmd = _command(data[4:], length)
                if cmd is not None:
                    return cmd
        return _command(data, -1)
    except (IndexError, ValueError):
        return None


def parse_answer(data: bytes) -> Answer:
    """The status of the first packet of an answer (sequence > 0). Never raises."""
    if len(data) < 4 or data[3] == 0 or _le24(data) == 0:
        return Answer("unknown")
    length, payload = _le24(data), data[4:]
    if not payload:
        return Answer("ok")  # the header alone was read first
    first = payload[0]
    if first == ERR:
        code = int.from_bytes(payload[1:3], "little") if len(payload) >= 3 else 0
        state = payload[4:9].decode("ascii", errors="replace") if payload[3:4] == b"#" else ""
        return Answer("failed", code, state)
    if first == OK:
        if length in (12, 13) and len(payload) >= 5:  # PREPARE_OK: id, columns, params, 0, warnings (, metadata)
            return Answer("ok", statement_id=int.from_bytes(payload[1:5], "little"))
        return Answer("ok")
    if first == EOF:
        return Answer("ok")
    # a result set: its column count (a length-encoded integer), alone in its packet or followed
    # by a "metadata follows" byte (MariaDB's cached metadata, MySQL 8's optional metadata)
    size = 1 if first < 0xFB else {0xFC: 3, 0xFD: 4}.get(first, 0)
    if size and length in (size, size + 1):
        return Answer("ok")
    return Answer("unknown")


class Mysql(p.Protocol):
    id = contract.MYSQL
    name = "mysql"
    stem = p.Stem("mysql", "queries")
    # Captured between MariaDB 10.11 (Debian's mariadb-server) and a client on the wire: the
    # client's COM_QUERY, COM_STMT_PREPARE and COM_STMT_EXECUTE, then the payloads as the server
    # read them after their headers; a MySQL 8 client's COM_QUERY (empty query attributes).
    kernel_requests = (
        bytes.fromhex("190000000353454c4543542030202b20312c20277365637265742d3027"),
        bytes.fromhex("190000001653454c454354203f202b20312c2027616263272041532073"),
        bytes.fromhex("1600000017040000000001000000000108000100000000000000"),
        bytes.fromhex("0353454c4543542030202b20312c20277365637265742d3027"),
        bytes.fromhex("1653454c454354203f202b20312c2027616263272041532073"),
        bytes.fromhex("17040000000001000000000108000100000000000000"),
        b"\x0b\x00\x00\x00\x03\x00\x01SELECT 1",
    )
    kernel_non_requests = (
        bytes.fromhex("050000001904000000"),  # COM_STMT_CLOSE: no answer
        bytes.fromhex("1904000000"),  # the same, as the server reads it
        bytes.fromhex("0100000001"),  # COM_QUIT
        bytes.fromhex("010000000e"),  # COM_PING
        bytes.fromhex("030000000263"),  # COM_INIT_DB
        bytes.fromhex("19000000"),  # a header the server reads alone
        bytes.fromhex("640000000a352e352e352d31302e31312e31392d4d6172696144422d302b6465623132753100"),  # greeting
        bytes.fromhex("510000010da20a000000000121000000000000000000000000000000000000000000000063610014"),  # login
        bytes.fromhex("0da20a000000000121000000000000000000000000000000000000000000000063610014"),  # its payload
        bytes.fromhex("1a0000000353454c4543542030202b20312c20277365637265742d3027"),  # the length is not the call's
        bytes.fromhex("190000010353454c4543542030202b20312c20277365637265742d3027"),  # sequence 1
        bytes.fromhex("160301020001000001fc0303"),  # a TLS ClientHello
        bytes.fromhex("17030300458a1b2c3d4e5f60718293a4"),  # TLS application data
        b"\x03\x01\x02garbage",
    )

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._statements: p.Lru[tuple[p.ConnKey, int], str] = p.Lru(MAX_STATEMENTS)

    def _mask(self, sql: str) -> str:
        return mask_literals(sql) if self.settings.masks.sql_literals else sql

    def _remember(self, conn: p.ConnKey, statement_id: int, text: str) -> None:
        key = (conn, statement_id)
        self._statements.put(key, sys.intern(text))

    def _prepared(self, conn: p.ConnKey, statement_id: int) -> str | None:
        return self._statements.get((conn, statement_id))

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        cmd = parse_command(request)
        if cmd is None:
            return []
        answer = parse_answer(response)
        if cmd.code == COM_STMT_EXECUTE:
            text = self._prepared(conn, cmd.statement_id)
            statement = text if text is not None else f"EXECUTE {cmd.statement_id} /* unknown */"
        else:
            text = self._mask(cmd.text) + (TRUNCATED if cmd.truncated else "")
            statement = text
            if cmd.code == COM_STMT_PREPARE:
                if answer.statement_id >= 0:
                    self._remember(conn, answer.statement_id, text)
                    statement = f"PREPARE {answer.statement_id} FROM {text}"
                else:
                    statement = f"PREPARE FROM {text}"
        error = str(answer.code) if answer.status == "failed" else ""
        return [p.Request(self.id, answer.status, seconds, METHODS[cmd.code], statement=statement, error=error)]

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        if not r.statement:
            return None
        return p.db_span(r, "mysql", "query")
