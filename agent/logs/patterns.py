"""Log levels and log patterns.

Level: from a JSON `level`-like field, a journald PRIORITY, or an explicit level word near the
start of the line; Coroot's lower-case values (critical, error, warning, info, debug, unknown).

Pattern: the message with its variable tokens masked (quoted strings, UUIDs, IPs, hex, numbers),
grouped with near-identical token sequences (same length, at least 70% equal tokens). Each
container keeps at most `cap` patterns; later ones fall into one "unclassified" pattern, named as
the node agent names it (coroot/logparser: hash of 32 zeros, a fixed sample). The hash is FNV-1a
64 of the first masked form, hex: stable for the life of the pattern. Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.hashing import fnv1a64

UNCLASSIFIED_HASH = "0" * 32
UNCLASSIFIED_SAMPLE = "unclassified pattern (pattern limit reached)"
LEVELS = ("critical", "error", "warning", "info", "debug", "unknown")
SEVERITY_NUMBER = {"critical": 21, "error": 17, "warning": 13, "info": 9, "debug": 5, "unknown": 0}

_WORDS = [
    ("critical", re.compile(r"(?i)\b(crit(ical)?|fatal|panic|emerg(ency)?|alert)\b")),
    ("error", re.compile(r"(?i)\b(error|err|severe|exception)\b")),
    ("warning", re.compile(r"(?i)\b(warn(ing)?)\b")),
    ("info", re.compile(r"(?i)\b(info|notice)\b")),
    ("debug", re.compile(r"(?i)\b(debug|trace|fine)\b")),
]
_FIELD = {"crit": "critical", "critical": "critical", "fatal": "critical", "panic": "critical",
          "emerg": "critical", "alert": "critical", "error": "error", "err": "error", "severe": "error",
          "warn": "warning", "warning": "warning", "info": "info", "notice": "info",
          "information": "info", "debug": "debug", "trace": "debug"}
_PRIORITY = {0: "critical", 1: "critical", 2: "critical", 3: "error", 4: "warning", 5: "info", 6: "info", 7: "debug"}


def level_of_word(value: str) -> str:
    return _FIELD.get(value.strip().lower(), "unknown")


def level_of_priority(priority: int) -> str:
    return _PRIORITY.get(priority, "unknown")


_ANY_WORD = re.compile(
    r"(?i)\b(crit(?:ical)?|fatal|panic|emerg(?:ency)?|alert|error|err|severe|exception|warn(?:ing)?"
    r"|info|notice|debug|trace|fine)\b")
_RANK = {level: i for i, (level, _) in enumerate(_WORDS)}


def detect_level(message: str) -> str:
    """The most severe level word in the first 64 characters (one regex pass)."""
    best = "unknown"
    for word in _ANY_WORD.findall(message[:64]):
        for level, rx in _WORDS:
            if rx.fullmatch(word):
                if best == "unknown" or _RANK[level] < _RANK[best]:
                    best = level
                break
    return best


# One pass: quoted strings, UUIDs, IPs, hex, numbers (alternatives tried in that order).
_MASK = re.compile(
    r"\"[^\"]*\"|'[^']*'"
    r"|\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"
    r"|\b0x[0-9a-fA-F]+\b|\b[0-9a-fA-F]*\d[0-9a-fA-F]*[a-fA-F][0-9a-fA-F]*\b"
    r"|[-+]?\b\d[\d.,:]*\b")
MAX_TOKENS = 64


def mask(message: str) -> list[str]:
    return _MASK.sub("<*>", message.split("\n", 1)[0][:1024]).split()[:MAX_TOKENS]


@dataclass
class Pattern:
    tokens: list[str]
    hash: str
    sample: str


@dataclass
class PatternSet:
    """One container's patterns."""

    cap: int = 256
    by_len: dict[int, list[Pattern]] = field(default_factory=dict)
    count: int = 0
    unclassified: Pattern = field(default_factory=lambda: Pattern([], UNCLASSIFIED_HASH, UNCLASSIFIED_SAMPLE))

    def match(self, message: str) -> Pattern:
        tokens = mask(message)
        for p in self.by_len.get(len(tokens), ()):
            same = sum(1 for a, b in zip(p.tokens, tokens, strict=True) if a == b)
            if not tokens or same / len(tokens) >= 0.7:
                return p
        if self.count >= self.cap:
            return self.unclassified
        h = format(fnv1a64([" ".join(tokens).encode()]), "016x")
        p = Pattern(tokens, h, message.split("\n", 1)[0][:256])
        self.by_len.setdefault(len(tokens), []).append(p)
        self.count += 1
        return p
