"""PII scrubber for log bodies, on by default before anything is stored: e-mail addresses, card
numbers (Luhn-checked), bearer tokens and JWTs, `password=`/`secret=`-style values, and
optionally IPv4 addresses. Each kind becomes a fixed marker, so the log pattern of a line is
the same before and after masking. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\b")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
_SECRET_KV = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|client[_-]?secret)"
    r"(\"?\s*[=:]\s*\"?)([^\s\"',;&]+)")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_SECRET_HINT = re.compile(r"pass|pwd|secret|token|key")
_DIGITS13 = re.compile(r"\d(?:[ -]?\d){12}")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Scrubber:
    emails: bool = True
    cards: bool = True
    tokens: bool = True
    secrets: bool = True
    ipv4: bool = False

    def __call__(self, text: str) -> str:
        # Cheap substring checks first: most lines hold none of these, and skip the regexes.
        low = text.lower()
        if self.tokens:
            if "eyj" in low:
                text = _JWT.sub("<jwt>", text)
            if "bearer" in low:
                text = _BEARER.sub(lambda m: f"{m.group(1)} <token>", text)
        if self.secrets and _SECRET_HINT.search(low):
            text = _SECRET_KV.sub(lambda m: f"{m.group(1)}{m.group(2)}<secret>", text)
        if self.emails and "@" in text:
            text = _EMAIL.sub("<email>", text)
        if self.cards and _DIGITS13.search(text):
            def card(m: re.Match[str]) -> str:
                digits = re.sub(r"\D", "", m.group(0))
                return "<card>" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group(0)

            text = _CARD.sub(card, text)
        if self.ipv4:
            text = _IPV4.sub("<ip>", text)
        return text
