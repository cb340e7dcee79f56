"""Parsing of the value kinds used in configuration: durations, sizes, host:port, http(s) URLs
(split from their user and password), and the redaction of credentials in URLs and messages.

Pure functions; each raises ValueError with a message that says what was expected. A message
never repeats a password it was given.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)")


def parse_duration(text: str | int | float) -> float:
    """'30s', '7d', '1h30m', '250ms' -> seconds. A bare number is seconds."""
    if isinstance(text, bool):
        raise ValueError(f"expected a duration like 30s, 36h or 7d, got {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"a duration cannot be negative, got {text!r}")
        return float(text)
    s = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    pos = 0
    total = 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"expected a duration like 30s, 36h or 7d, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """The shortest exact form: 604800 -> '7d', 5400 -> '90m', 1.5 -> '1500ms'."""
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(round(seconds * 1000))}ms"


def parse_size(text: str | int) -> int:
    """'500MB' -> 500_000_000, '1GiB' -> 1_073_741_824, '200Mi' -> 209_715_200."""
    if isinstance(text, bool):
        raise ValueError(f"expected a size like 500MB or 1GiB, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative, got {text!r}")
        return text
    m = _SIZE_RE.fullmatch(str(text).strip())
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 500MB or 1GiB, got {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_host_port(text: str) -> tuple[str, int]:
    """'127.0.0.1:8080', ':8080', '[::1]:8080' -> (host, port)."""
    s = str(text).strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s]*):(\d+)", s)
    if not m:
        raise ValueError(f"expected host:port like 127.0.0.1:8080, got {text!r}")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, got {port}")
    return host or "0.0.0.0", port


def parse_port_range(text: str) -> tuple[int, int]:
    """'32768-60999' -> (32768, 60999)."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"expected a port range like 32768-60999, got {text!r}")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not (0 < lo <= hi < 65536):
        raise ValueError(f"expected 1 <= low <= high <= 65535, got {text!r}")
    return lo, hi


# ------------------------------------------------------------------- URLs --

HTTP_SCHEMES = ("http", "https")
REDACTED = "<redacted>"
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#]*@")


@dataclass(frozen=True)
class HttpUrl:
    """An http(s) URL split from its credentials: `url` never holds a user or password."""

    url: str
    scheme: str
    user: str = ""
    password: str = ""

    @property
    def has_credentials(self) -> bool:
        return bool(self.user or self.password)


def redact_url(text: str) -> str:
    """The URL for a log line or an error: everything between `scheme://` and the last `@`
    before the path becomes <redacted>. A text that is not a URL is returned masked the same way
    (a password may hold `/` or `?`, so the last `@` of the whole text counts when in doubt)."""
    s = str(text)
    if "@" not in s:
        return s
    start = s.find("://")
    start = start + 3 if start >= 0 else 0
    at = s.rfind("@")
    if at < start:
        return s
    return s[:start] + REDACTED + s[at:]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """A message (an exception's text, a server's answer) with every known secret and every
    `scheme://userinfo@` replaced by <redacted>."""
    s = str(text)
    for secret in sorted({x for x in secrets if x}, key=len, reverse=True):
        if len(secret) >= 6:
            s = s.replace(secret, REDACTED)
        else:  # a short secret only where it stands alone, or every "k" in a message would go
            s = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", REDACTED, s)
    return _USERINFO_RE.sub(lambda m: m.group(1) + REDACTED + "@", s)


def parse_http_url(text: str) -> HttpUrl:
    """'https://user:pass@host:9090/api/v1/write' -> HttpUrl('https://host:9090/api/v1/write',
    'https', 'user', 'pass'). Only http and https; the user and password are percent-decoded.
    A ValueError's message shows the URL redacted, never a password."""
    s = str(text).strip()
    shown = redact_url(s)
    if _CONTROL_RE.search(s):
        raise ValueError(f"a URL cannot contain spaces or control characters, got {shown!r}")
    scheme, sep, rest = s.partition("://")
    if not sep or scheme.lower() not in HTTP_SCHEMES:
        raise ValueError(f"only http:// and https:// URLs are accepted, got {shown!r}")
    scheme = scheme.lower()
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hostport = authority.rpartition("@")
    if "@" in tail:
        raise ValueError(
            f"an '@' after the host in {shown!r}: if it belongs to a user or password, "
            "percent-encode it ('@' as %40, '/' as %2F, '?' as %3F, '#' as %23)")
    try:
        parsed = urllib.parse.urlsplit(f"{scheme}://{hostport}{tail}")
        parsed.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:
        raise ValueError(f"expected a URL like https://host:port/path, got {shown!r}") from None
    if not parsed.hostname:
        raise ValueError(f"the URL has no host, got {shown!r}")
    user, _, password = userinfo.partition(":")
    if at and not (user or password):
        raise ValueError(f"an empty user and password before '@' in {shown!r}")
    return HttpUrl(
        url=f"{scheme}://{hostport}{tail}", scheme=scheme,
        user=urllib.parse.unquote(user), password=urllib.parse.unquote(password),
    )
