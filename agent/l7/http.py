"""HTTP/1.x: request line (method, path with query values masked) and response status, for
keep-alive and pipelined requests. Works on the first bytes of a payload (a truncated header
still yields the request line)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE")
_REQUEST = re.compile(rb"(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE) (\S{1,4096}) HTTP/1\.([01])\r\n")
_RESPONSE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\r\n")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # query-string values masked
    version: str


@dataclass(frozen=True)
class Response:
    status: int

    @property
    def status_class(self) -> str:
        return f"{self.status // 100}xx" if 100 <= self.status < 600 else "unknown"


def is_request(data: bytes) -> bool:
    return data.startswith(tuple(m.encode() + b" " for m in METHODS))


def mask_query(path: str) -> str:
    """Keep the names of query parameters, never their values."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    names = []
    for part in query.split("&"):
        name = part.split("=", 1)[0]
        names.append(quote(unquote(name), safe="") + ("=*" if "=" in part else ""))
    return base + "?" + "&".join(names)


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


def _next_message(data: bytes, head_end: int, headers: bytes) -> int:
    """Where the next pipelined message starts: after the headers and any body."""
    m = _CONTENT_LENGTH.search(headers)
    return head_end + 4 + (int(m.group(1)) if m else 0)


def parse_requests(data: bytes, mask: bool = True) -> list[Request]:
    """Every request in the payload: several when requests are pipelined. `mask`: query-string
    values become `*` (on by default)."""
    out: list[Request] = []
    pos = 0
    try:
        while pos < len(data):
            m = _REQUEST.match(data, pos)
            if not m:
                break
            path = m.group(2).decode("latin-1")
            out.append(Request(m.group(1).decode(), mask_query(path) if mask else path, "1." + m.group(3).decode()))
            head_end = data.find(b"\r\n\r\n", m.end() - 2)
            if head_end < 0:
                break
            pos = _next_message(data, head_end, data[m.start():head_end])
    except Exception:  # noqa: BLE001 - garbage in, nothing out
        return out
    return out


def parse_responses(data: bytes) -> list[Response]:
    """Every response status in the payload (pipelined responses follow each other)."""
    out: list[Response] = []
    pos = 0
    try:
        while pos < len(data):
            m = _RESPONSE.match(data, pos)
            if not m:
                break
            out.append(Response(int(m.group(1))))
            head_end = data.find(b"\r\n\r\n", m.end() - 2)
            if head_end < 0:
                break
            pos = _next_message(data, head_end, data[m.start():head_end])
    except Exception:  # noqa: BLE001
        return out
    return out
