"""Log levels and log patterns.

Level: from a JSON `level`-like field, a journald PRIORITY, or an explicit level word near the
start of the line; Coroot's lower-case values (critical, error, warning, info, debug, unknown).

Pattern (critical, error and warning messages only; the other levels have none, as in
logparser's Parser.inc): the message's words as the node agent's log parser takes them (coroot/logparser
pattern.go, read at v1.2.2; the node agent pins v1.3.2), grouped with weakly equal word lists
(same length, at most one word different) of the same level. Each container keeps at most `cap`
patterns per level; later ones fall into that level's "unclassified" pattern, named as the node
agent names it (hash of 32 zeros, a fixed sample). The hash is md5 of the first message's words
joined by spaces, as the node agent's `pattern_hash`. Pure.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

UNCLASSIFIED_HASH = "0" * 32
# logparser (Parser.inc) makes no pattern of these levels' messages: they count under one series
# per level with an empty pattern_hash and sample, and their records carry an empty pattern.hash;
# critical, error and warning messages get their pattern's hash.
UNPATTERNED_LEVELS = frozenset({"unknown", "debug", "info"})
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


# Pattern words as the node agent's log parser (coroot/logparser, pattern.go) takes them: quoted
# text and bracketed groups dropped, the rest split on white space, each field stripped of
# trailing "=:],;", fields shorter than two bytes and hex numbers (0x..., 4+ hex digits) and
# UUIDs dropped, digits removed, and only words of letters with inner ".", "_" or "-" kept (the
# first 100). The hash is md5 of the words joined by one space, in lower-case hex: the same
# words give the node agent's `pattern_hash`.
_GO_SPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_HEX_PREFIXED = re.compile(r"0x[a-fA-F0-9]+")
_HEX = re.compile(r"[a-fA-F0-9]{4,}")
_UUID = re.compile(r"[a-fA-F0-9]{8}-[a-fA-F0-9]{4}-[a-fA-F0-9]{4}-[a-fA-F0-9]{4}-[a-fA-F0-9]{12}")
_DIGITS = re.compile(r"[0-9]+")
_WORD = re.compile(r"[A-Za-z][A-Za-z._-]*[A-Za-z]")
_OPEN = {"]": "[", ")": "(", "}": "{"}
_OPENERS = re.compile(r"[\[({\"']")
MAX_WORDS = 100
MAX_DIFF = 1


def _outside_quotes_and_brackets(s: str) -> str:
    """`s` without quoted strings and (nested) bracketed groups; a backslash escapes a quote."""
    if not _OPENERS.search(s):
        return s  # nothing opens a quote or a group: every character is kept (the common line)
    out: list[str] = []
    quote = ""
    brackets: list[str] = []
    prev = ""
    for ch in s:
        before, prev = prev, ch
        if ch in "[({":
            if not quote:
                brackets.append(ch)
        elif ch in _OPEN:
            if brackets and brackets[-1] == _OPEN[ch]:
                brackets.pop()
                continue
        elif ch in "\"'":
            if before != "\\" and not brackets:
                if not quote:
                    quote = ch
                elif quote == ch:
                    quote = ""
                    continue
        if quote or brackets:
            continue
        out.append(ch)
    return "".join(out)


def pattern_words(message: str) -> list[str]:
    words: list[str] = []
    for field_ in _GO_SPACE.split(_outside_quotes_and_brackets(message)):
        w = field_.rstrip("=:],;")
        if len(w.encode()) < 2:
            continue
        if _HEX_PREFIXED.fullmatch(w) or _HEX.fullmatch(w) or _UUID.fullmatch(w):
            continue
        w = _DIGITS.sub("", w)
        if not _WORD.fullmatch(w):
            continue
        words.append(w)
        if len(words) >= MAX_WORDS:
            break
    return words


def pattern_hash(words: list[str]) -> str:
    return hashlib.md5(" ".join(words).encode(), usedforsecurity=False).hexdigest()


def weak_equal(a: list[str], b: list[str]) -> bool:
    """Same number of words, at most one of them different (logparser's grouping)."""
    return len(a) == len(b) and sum(1 for x, y in zip(a, b, strict=True) if x != y) <= MAX_DIFF


@dataclass
class Pattern:
    tokens: list[str]
    hash: str
    sample: str


NO_PATTERN = Pattern([], "", "")  # what a message of UNPATTERNED_LEVELS matches


@dataclass
class PatternSet:
    """One container's patterns, per level: a message joins the pattern of its level with its
    words' hash, else one whose words are weakly equal, else a new one while the level has fewer
    than `cap`, else the level's "unclassified" pattern."""

    cap: int = 256
    by_level: dict[str, dict[str, Pattern]] = field(default_factory=dict)
    count: int = 0

    def match(self, message: str, level: str = "unknown") -> Pattern:
        if level in UNPATTERNED_LEVELS:
            return NO_PATTERN
        words = pattern_words(message)
        h = pattern_hash(words)
        patterns = self.by_level.setdefault(level, {})
        p = patterns.get(h)
        if p is not None:
            return p
        for p in patterns.values():
            if p.hash != UNCLASSIFIED_HASH and weak_equal(p.tokens, words):
                return p
        known = len(patterns) - (UNCLASSIFIED_HASH in patterns)
        if known >= self.cap:
            p = patterns.get(UNCLASSIFIED_HASH)
            if p is None:
                p = patterns[UNCLASSIFIED_HASH] = Pattern([], UNCLASSIFIED_HASH, UNCLASSIFIED_SAMPLE)
            return p
        p = Pattern(words, h, message.split("\n", 1)[0][:256])
        patterns[h] = p
        self.count += 1
        return p
