"""Postgres wire protocol (v3): the simple and extended query protocols on the frontend side,
CommandComplete/ErrorResponse on the backend side, and prepared statements remembered per
connection. Statement text is stored with literals masked; password messages are never kept."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from agent.l7 import contract
from agent.l7 import protocol as p
from agent.l7.sql import mask_literals

_INT32 = struct.Struct("!i")


@dataclass(frozen=True)
class Query:
    statement: str  # literals masked
    kind: str  # simple | extended


@dataclass(frozen=True)
class Result:
    error: bool
    code: str = ""  # SQLSTATE of an ErrorResponse
    message: str = ""


@dataclass
class Connection:
    """Per-connection state: named prepared statements (bounded)."""

    prepared: dict[str, str] = field(default_factory=dict)
    max_prepared: int = 1024


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(b"\0", pos)
    return data[pos:end].decode("utf-8", errors="replace"), end + 1


def _messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of each complete message; a truncated last one yields its partial body."""
    out = []
    pos = 0
    while pos + 5 <= len(data):
        kind = data[pos:pos + 1]
        (length,) = _INT32.unpack_from(data, pos + 1)
        if length < 4 or not kind.isalpha() and kind not in b"123":
            break
        out.append((kind, data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def is_startup_or_password(data: bytes) -> bool:
    """A StartupMessage/SSLRequest (no type byte) or a PasswordMessage: never parsed further."""
    if data[:1] == b"p":
        return True
    if len(data) >= 8:
        (length,) = _INT32.unpack_from(data, 0)
        (proto,) = _INT32.unpack_from(data, 4)
        return 8 <= length <= 10000 and proto in (196608, 80877103, 80877102, 80877104)
    return False


def parse_queries(data: bytes, conn: Connection | None = None, mask: bool = True) -> list[Query]:
    """Queries a frontend payload runs: one per simple Query, per unnamed Parse and per Bind of a
    statement. A Bind of a statement prepared before the agent saw it runs with an empty text.
    `mask`: literals become `?` (on by default)."""
    masker = mask_literals if mask else (lambda s: s)
    out: list[Query] = []
    if is_startup_or_password(data):
        return out
    try:
        for kind, body in _messages(data):
            if kind == b"Q":
                sql = body.split(b"\0", 1)[0].decode("utf-8", errors="replace")
                out.append(Query(masker(sql), "simple"))
            elif kind == b"P":
                name, pos = _cstring(body, 0)
                sql, _ = _cstring(body, pos) if b"\0" in body[pos:] else (body[pos:].decode(errors="replace"), 0)
                masked = masker(sql)
                if conn is not None and len(conn.prepared) < conn.max_prepared:
                    conn.prepared[name] = masked
                if not name:  # an unnamed statement runs right away
                    out.append(Query(masked, "extended"))
            elif kind == b"B":
                _portal, pos = _cstring(body, 0)
                stmt, _ = _cstring(body, pos)
                if stmt:  # a named statement (an unnamed one ran with its Parse)
                    out.append(Query(conn.prepared.get(stmt, "") if conn is not None else "", "extended"))
            elif kind == b"C" and body[:1] == b"S":  # Close statement
                name, _ = _cstring(body, 1)
                if conn is not None:
                    conn.prepared.pop(name, None)
    except (ValueError, struct.error, IndexError):
        return out
    return out


def parse_results(data: bytes) -> list[Result]:
    out: list[Result] = []
    try:
        for kind, body in _messages(data):
            if kind == b"C":
                out.append(Result(False))
            elif kind == b"E":
                fields = {}
                pos = 0
                while pos < len(body) and body[pos:pos + 1] != b"\0":
                    code = body[pos:pos + 1].decode("latin-1")
                    value, pos = _cstring(body, pos + 1)
                    fields[code] = value
                out.append(Result(True, fields.get("C", ""), fields.get("M", "")))
    except (ValueError, struct.error, IndexError):
        return out
    return out


def status_of(resp: bytes) -> tuple[str, str]:
    """ok / failed (with the SQLSTATE) / unknown from the first bytes of a backend reply."""
    results = parse_results(resp)
    for r in results:
        if r.error:
            return "failed", r.code
    if results or resp[:1] in (b"1", b"2", b"T", b"D", b"n", b"s", b"I", b"Z", b"t", b"N", b"S", b"3"):
        return "ok", ""
    return "unknown", ""


MAX_CONNECTIONS = 4096  # connections whose prepared statements are remembered (LRU)


class Postgres(p.Protocol):
    id = contract.POSTGRES
    name = "postgres"
    stem = p.Stem("postgres", "queries")
    kernel_requests = (
        b"Q\0\0\0\x0eSELECT 1;\0",
        b"P\0\0\0\x11\0SELECT $1\0\0\0B\0\0\0\x0c\0\0\0\0\0\0\0\0E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04",
    )
    kernel_non_requests = (b"Q\0\0\0\x20SELECT 1;\0", b"P\0\0\0\x10\0SELECT $1\0\0\0H\0\0\0\x04",
                           b"\0\0\0\x08\x04\xd2\x16\x2f")

    def __init__(self, settings: p.Settings) -> None:
        super().__init__(settings)
        self._conns: p.Lru[p.ConnKey, Connection] = p.Lru(MAX_CONNECTIONS)

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        state = self._conns.setdefault(conn, Connection)
        queries = parse_queries(request, state, mask=self.settings.masks.sql_literals)
        if not queries:
            return []  # a Parse that only prepares, a Close, a Sync
        status, code = status_of(response)
        return [p.Request(self.id, status, seconds, "query", statement=q.statement, error=code) for q in queries]

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        return p.db_span(r, "postgresql", r.method)
