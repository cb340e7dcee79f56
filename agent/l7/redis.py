"""Redis RESP2/RESP3: commands (pipelines included) and replies (errors: `-...`, RESP3 `!...`).
Arguments are never kept except the key of key-value commands; AUTH's password and values of
SET-like commands are masked."""

from __future__ import annotations

from dataclasses import dataclass

from agent.l7 import contract
from agent.l7 import protocol as p

_KEY_COMMANDS = {"GET", "SET", "SETEX", "PSETEX", "SETNX", "GETSET", "DEL", "EXISTS", "EXPIRE", "INCR", "DECR",
                 "INCRBY", "DECRBY", "HGET", "HSET", "HGETALL", "HDEL", "LPUSH", "RPUSH", "LPOP", "RPOP", "LRANGE",
                 "SADD", "SREM", "SMEMBERS", "ZADD", "ZRANGE", "ZREM", "APPEND", "TTL", "TYPE", "MGET", "MSET"}


@dataclass(frozen=True)
class Command:
    name: str
    statement: str  # what a span shows: the command, its key, masked values


@dataclass(frozen=True)
class Reply:
    error: bool


def _read_line(data: bytes, pos: int) -> tuple[bytes, int] | None:
    end = data.find(b"\r\n", pos)
    if end < 0:
        return None
    return data[pos:end], end + 2


def _array(data: bytes, pos: int) -> tuple[list[bytes], int] | None:
    head = _read_line(data, pos)
    if head is None or not head[0].startswith(b"*"):
        return None
    n = int(head[0][1:])
    if n < 0 or n > 1_000_000:
        return None
    pos = head[1]
    items = []
    for _ in range(n):
        h = _read_line(data, pos)
        if h is None or not h[0].startswith(b"$"):
            return None
        size = int(h[0][1:])
        if size < 0 or h[1] + size + 2 > len(data):
            return None
        items.append(data[h[1]:h[1] + size])
        pos = h[1] + size + 2
    return items, pos


def _statement(args: list[bytes], mask: bool = True) -> Command:
    name = args[0].decode("latin-1").upper()
    if not mask:
        return Command(name, " ".join(a.decode("utf-8", errors="replace") for a in args))
    if name == "AUTH":
        return Command(name, "AUTH " + " ".join("?" for _ in args[1:]))
    if name in _KEY_COMMANDS and len(args) > 1:
        extra = " ?" * (len(args) - 2)
        return Command(name, f"{name} {args[1].decode('utf-8', errors='replace')}{extra}")
    return Command(name, name + " ?" * (len(args) - 1))


def parse_commands(data: bytes, mask: bool = True) -> list[Command]:
    """Every command in the payload (a pipeline holds several); inline commands too. `mask`:
    arguments other than the key become `?` (on by default)."""
    out: list[Command] = []
    pos = 0
    try:
        while pos < len(data):
            if data[pos:pos + 1] == b"*":
                arr = _array(data, pos)
                if arr is None or not arr[0]:
                    break
                out.append(_statement(arr[0], mask))
                pos = arr[1]
            else:
                line = _read_line(data, pos)
                if line is None or not line[0] or not line[0][:1].isalpha():
                    break
                out.append(_statement(line[0].split(), mask))
                pos = line[1]
    except (ValueError, IndexError):
        return out
    return out


def _skip_value(data: bytes, pos: int, depth: int = 0) -> int | None:
    """Position after one RESP2/RESP3 value starting at pos, or None when truncated."""
    line = _read_line(data, pos)
    if line is None or not line[0] or depth > 32:
        return None
    kind, rest, nxt = line[0][:1], line[0][1:], line[1]
    if kind in b"+-:_#,(":
        return nxt
    if kind in b"$!=":
        size = int(rest)
        return nxt if size < 0 else (nxt + size + 2 if nxt + size + 2 <= len(data) else None)
    if kind in b"*~>%|":
        n = int(rest) * (2 if kind in b"%|" else 1)
        for _ in range(max(n, 0)):
            p = _skip_value(data, nxt, depth + 1)
            if p is None:
                return None
            nxt = p
        return nxt
    raise ValueError("not RESP")


def parse_replies(data: bytes) -> list[Reply]:
    out: list[Reply] = []
    pos = 0
    try:
        while pos < len(data):
            kind = data[pos:pos + 1]
            nxt = _skip_value(data, pos)
            if nxt is None:
                if kind in (b"-", b"!"):
                    out.append(Reply(True))
                elif kind:
                    out.append(Reply(False))
                break
            out.append(Reply(kind in (b"-", b"!")))
            pos = nxt
    except (ValueError, IndexError):
        return out
    return out


class Redis(p.Protocol):
    id = contract.REDIS
    name = "redis"
    stem = p.Stem("redis", "queries")
    kernel_requests = (b"*1\r\n$4\r\nPING\r\n", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
    kernel_non_requests = (b"+OK\r\n", b"*0\r\n", b"$4\r\nPING\r\n", b"PING\r\n")

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        cmds = parse_commands(request, mask=self.settings.masks.redis_values)
        replies = parse_replies(response)
        out = []
        for i, cmd in enumerate(cmds):
            status = ("failed" if replies[i].error else "ok") if i < len(replies) else "unknown"
            out.append(p.Request(self.id, status, seconds, cmd.name, statement=cmd.statement))
        return out

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        return p.db_span(r, "redis", r.method, operation=r.method)
