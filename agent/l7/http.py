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
        return status_class(self.status)


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
_METHOD = {m.encode(): m for m in METHODS}
_VERSION = {b"0": "1.0", b"1": "1.1"}
# status code -> the metric's status label
_STATUS_CLASS = {code: f"{code // 100}xx" for code in range(100, 600)}
# Paths that masking leaves as they are, decoded once: most requests repeat a few paths. A path
# that masking changes is never kept (its secret or query values stay out of the agent's memory).
_PLAIN_PATHS: dict[tuple[bytes, bool, bool], str] = {}
PLAIN_PATHS_MAX = 4096


def status_class(code: int) -> str:
    return _STATUS_CLASS.get(code, "unknown")


def _next_message(data: bytes, start: int, head_end: int) -> int:
    """Where the next pipelined message starts: after the headers of the one at `start` and any body."""
    m = _CONTENT_LENGTH.search(data, start, head_end)
    return head_end + 4 + (int(m.group(1)) if m else 0)


def _path(raw: bytes, mask: bool, mask_path: bool) -> str:
    key = (raw, mask, mask_path)
    path = _PLAIN_PATHS.get(key)
    if path is not None:
        return path
    path = raw.decode("latin-1")
    masked = path
    if mask:
        masked = mask_query(masked)
    if mask_path:
        masked = mask_url_path(masked)
    if masked == path:
        if len(_PLAIN_PATHS) >= PLAIN_PATHS_MAX:
            _PLAIN_PATHS.clear()
        _PLAIN_PATHS[key] = path
    return masked


def request_lines(data: bytes, mask: bool = True, mask_path: bool = True) -> list[tuple[str, str, str]]:
    """(method, path, version) of every request in the payload, as `parse_requests` finds them."""
    out: list[tuple[str, str, str]] = []
    pos = 0
    size = len(data)
    try:
        while pos < size:
            m = _REQUEST.match(data, pos)
            if not m:
                break
            method, raw, minor = m.group(1, 2, 3)
            out.append((_METHOD[method], _path(raw, mask, mask_path), _VERSION[minor]))
            head_end = data.find(b"\r\n\r\n", m.end() - 2)
            if head_end < 0 or data.find(b" HTTP/1.", head_end + 4) < 0:
                break  # no other request line can follow (the usual case: one request)
            pos = _next_message(data, m.start(), head_end)
    except Exception:  # noqa: BLE001 - garbage in, nothing out
        return out
    return out


def status_codes(data: bytes) -> list[int]:
    """The status code of every response in the payload, as `parse_responses` finds them."""
    out: list[int] = []
    pos = 0
    size = len(data)
    try:
        while pos < size:
            m = _RESPONSE.match(data, pos)
            if not m:
                break
            out.append(int(m.group(1)))
            head_end = data.find(b"\r\n\r\n", m.end() - 2)
            if head_end < 0 or data.find(b"HTTP/1.", head_end + 4) < 0:
                break  # no other status line can follow (the usual case: one response)
            pos = _next_message(data, m.start(), head_end)
    except Exception:  # noqa: BLE001
        return out
    return out


def parse_requests(data: bytes, mask: bool = True, mask_path: bool = True) -> list[Request]:
    """Every request in the payload: several when requests are pipelined. `mask`: query-string
    values become `*`; `mask_path`: secret-looking path segments and matrix parameter values
    become `*` (both on by default)."""
    return [Request(*line) for line in request_lines(data, mask, mask_path)]


def parse_responses(data: bytes) -> list[Response]:
    """Every response status in the payload (pipelined responses follow each other)."""
    return [Response(code) for code in status_codes(data)]


class Http(p.Protocol):
    """HTTP/1.x plug-in. Most HTTP requests are counted in the kernel (map l7_http, folded by
    the tracer); events reach this parser for spans and for what the map had no room for."""

    id = contract.HTTP
    name = "http"
    span_by_path = True
    stem = p.Stem("http", "requests")
    kernel_requests = tuple(f"{m} /x HTTP/1.1\r\nHost: a\r\n\r\n".encode() for m in METHODS)
    kernel_non_requests = (b"HTTP/1.1 200 OK\r\n\r\n", b"GETX / HTTP/1.1\r\n", b"get / HTTP/1.1\r\n",
                           b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"*1\r\n$4\r\nPING\r\n",
                           b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')  # NATS's CONNECT

    def parse(self, conn: p.ConnKey, request: bytes, response: bytes, seconds: float) -> list[p.Request]:
        m = self.settings.masks
        q, r = _REQUEST.match(request), _RESPONSE.match(response)
        if q is not None and r is not None:  # the usual pair, when nothing after either reads like a next message
            q_end, r_end = request.find(b"\r\n\r\n", q.end() - 2), response.find(b"\r\n\r\n", r.end() - 2)
            if ((q_end < 0 or request.find(b" HTTP/1.", q_end + 4) < 0)
                    and (r_end < 0 or response.find(b"HTTP/1.", r_end + 4) < 0)):
                method, raw, _minor = q.group(1, 2, 3)
                code = int(r.group(1))
                return [p.Request(self.id, _STATUS_CLASS.get(code, "unknown"), seconds, _METHOD[method],
                                  _path(raw, m.url_query, m.url_path), code)]
        reqs = request_lines(request, m.url_query, m.url_path)
        codes = status_codes(response)
        n = len(codes)
        if not reqs:
            return [p.Request(self.id, _STATUS_CLASS.get(codes[0], "unknown") if n else "unknown", seconds, "", "",
                              codes[0] if n else 0)]
        return [p.Request(self.id, _STATUS_CLASS.get(codes[i], "unknown") if i < n else "unknown", seconds, method,
                          path, codes[i] if i < n else 0)
                for i, (method, path, _v) in enumerate(reqs)]

    def span(self, r: p.Request, peer: p.Peer, tls: bool) -> p.Span | None:
        if self.settings.exclude_paths and r.path.partition("?")[0] in self.settings.exclude_paths:
            return None
        attrs = {"http.url": f"{'https' if tls else 'http'}://{peer.destination}{r.path}",
                 "http.method": r.method}
        s = p.Span(r.method or "unknown", attrs)
        if r.code:
            attrs["http.status_code"] = str(r.code)
            if r.code >= 400:
                s.status = "STATUS_CODE_ERROR"
        return s
