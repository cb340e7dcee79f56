"""HTTP/1.x: request line (method, path with query values and secret-looking path segments
masked) and response status, for keep-alive and pipelined requests. Works on the first bytes of a
payload (a truncated header still yields the request line).

Path masking (`mask_url_path`): a segment that looks like a secret becomes `*`: long hex (16+
hex digits), base64/base64url-like runs (20+ characters mixing letters and digits), JWT-shaped
tokens (`eyJ...`.`...`.`...`). UUIDs are kept: they are resource ids, not secrets, and they are
what makes a path useful to read. `;name=value` matrix parameters (`;jsessionid=...`) keep their
names and lose their values. Must not raise on any input."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from agent.l7 import contract
from agent.l7 import protocol as p

METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE")
_REQUEST = re.compile(rb"(" + "|".join(METHODS).encode() + rb") (\S{1,4096}) HTTP/1\.([01])\r\n")
_RESPONSE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\r\n")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # query-string values and secret-looking path segments masked
    version: str


@dataclass(frozen=True)
class Response:
    status: int

    @property
    def status_class(self) -> str:
        return f"{self.status // 100}xx" if 100 <= self.status < 600 else "unknown"


def is_request(data: bytes) -> bool:
    """A method and a space; CONNECT's target is an authority, never NATS's `CONNECT {options}`."""
    return data.startswith(tuple(m.encode() + b" " for m in METHODS)) and not data.startswith(b"CONNECT {")


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


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]{16,}")
_JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")
_B64 = re.compile(r"[A-Za-z0-9+_=%~.-]{20,}")
_ALNUM_RUN = re.compile(r"[A-Za-z0-9]{20,}")
_LETTER = re.compile(r"[A-Za-z]")
_DIGIT = re.compile(r"[0-9]")
_CLASS_SWITCH = re.compile(r"[A-Za-z][0-9]|[0-9][A-Za-z]")


def _secret_segment(seg: str) -> bool:
    """A path segment that looks like a token: long hex, JWT, or a base64-like run mixing letters
    and digits (either one 20+ alphanumeric run, or letters and digits interleaved 3+ times, which
    tells `Xk9fQ2...` from a slug like `release-notes-2023-10-01`)."""
    if len(seg) < 16 or _UUID.fullmatch(seg):
        return False
    if _HEX.fullmatch(seg) or _JWT.fullmatch(seg):
        return True
    if not _B64.fullmatch(seg) or not _LETTER.search(seg) or not _DIGIT.search(seg):
        return False
    run = _ALNUM_RUN.search(seg)
    if run and _LETTER.search(run.group(0)) and _DIGIT.search(run.group(0)):
        return True
    return len(_CLASS_SWITCH.findall(seg)) >= 3


def mask_url_path(path: str) -> str:
    """Secret-looking path segments become `*`; matrix parameter values become `*`. The query
    string (after `?`) is left as is: `mask_query` handles it."""
    base, sep, query = path.partition("?")
    segments = base.split("/")
    for i, seg in enumerate(segments):
        if not seg:
            continue
        name, semi, params = seg.partition(";")
        if _secret_segment(name):
            name = "*"
        if semi:
            masked = [p.split("=", 1)[0] + "=*" if "=" in p else ("*" if _secret_segment(p) else p)
                      for p in params.split(";")]
            name = name + ";" + ";".join(masked)
        segments[i] = name
    return "/".join(segments) + sep + query


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


def _next_message(data: bytes, head_end: int, headers: bytes) -> int:
    """Where the next pipelined message starts: after the headers and any body."""
    m = _CONTENT_LENGTH.search(headers)
    return head_end + 4 + (int(m.group(1)) if m else 0)


def parse_requests(data: bytes, mask: bool = True, mask_path: bool = True) -> list[Request]:
    """Every request in the payload: several when requests are pipelined. `mask`: query-string
    values become `*`; `mask_path`: secret-looking path segments and matrix parameter values
    become `*` (both on by default)."""
    out: list[Request] = []
    pos = 0
    try:
        while pos < len(data):
            m = _REQUEST.match(data, pos)
            if not m:
                break
            path = m.group(2).decode("latin-1")
            if mask:
                path = mask_query(path)
            if mask_path:
                path = mask_url_path(path)
            out.append(Request(m.group(1).decode(), path, "1." + m.group(3).decode()))
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


class Http(p.Protocol):
    """HTTP/1.x plug-in. Most HTTP requests are counted in the kernel (map l7_http, folded by
    the tracer); events reach this parser for spans and for what the map had no room for."""

    id = contract.HTTP
    name = "http"
    stem = p.Stem("http", "requests")
    kernel_requests = tuple(f"{m} /x HTTP/1.1\r\nHost: a\r\n\r\n".encode() for m in METHODS)
    kernel_non_requests = (b"HTTP/1.1 200 OK\r\n\r\n", b"GETX / HTTP/1.1\r\n", b"get / HTTP/1.1\r\n",
                           b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"*1\r\n$4\r\nPING\r\n",
                           b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')  # NATS's CONNECT

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        m = self.settings.masks
        reqs = parse_requests(request, mask=m.url_query, mask_path=m.url_path)
        resps = parse_responses(response)
        out = []
        for i, q in enumerate(reqs or [None]):
            code = resps[i].status if i < len(resps) else 0
            status = resps[i].status_class if i < len(resps) else "unknown"
            out.append(p.Request(self.id, status, seconds, q.method if q else "", q.path if q else "", code))
        return out

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        if r.path.partition("?")[0] in self.settings.exclude_paths:
            return None
        attrs = {"http.url": f"{'https' if tls else 'http'}://{peer.destination}{r.path}",
                 "http.method": r.method}
        s = p.Span(r.method or "unknown", attrs)
        if r.code:
            attrs["http.status_code"] = str(r.code)
            if r.code >= 400:
                s.status = "STATUS_CODE_ERROR"
        return s
