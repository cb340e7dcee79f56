"""SQL literal masking: every literal of a statement becomes `?` before the statement is stored.

A small hand-written scanner, linear in the length of the statement (each step either consumes a
token with an anchored, non-backtracking pattern or finds a closing delimiter with `str.find`).
It keeps keywords, identifiers (plain, "double-quoted", `backquoted`), operators, punctuation,
`$1`/`?` placeholders and whitespace; it turns into `?`:
  - single-quoted strings, with `''` doubling, and with the prefixes E'', N'', X'', B'';
  - dollar-quoted strings `$tag$ ... $tag$`;
  - numbers: integers, decimals, `.5`, scientific `1e10`, hex `0x..`, binary `0b..`; a sign right
    after an operator, `(`, `,` or a keyword such as WHERE is part of the number (`= -1` -> `= ?`).
Comments (`-- ...`, MySQL `# ...`, `/* ... */`, possibly nested) are dropped: each becomes one space.

Backslashes. Postgres standard strings treat `\\` as a plain character; E'' strings and MySQL
treat it as an escape. The scanner cannot know which server it is looking at, so when the
statement holds a backslash it is scanned twice, once under each convention, and every
character that is inside a literal (or comment) under EITHER convention is masked: the union of
both scans. The masked region of an ambiguous literal therefore runs from its opening quote to
the latest end any convention gives it, and extends further wherever the two readings keep
disagreeing (up to the end of the statement if they never agree again), so no content of a
literal survives whichever convention the server uses. Example: `SELECT 'C:\\', 'secret'` becomes
`SELECT ?`. The escape reading is MySQL's, where "double quotes" also make a string: in that scan
they are strings, so in a statement holding a backslash a "quoted identifier" is masked too (the
price of never letting a MySQL string through); without a backslash both readings agree and
"quoted" identifiers are kept.

Truncation. A string, dollar quote, quoted identifier or block comment with no end (the capture
cut the statement) masks everything to the end of the statement.

Must not: raise on any input, or use a regular expression that backtracks over the whole statement.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

_WS = re.compile(r"\s+")
# A run of tokens that can never start a literal or a comment: identifiers (not directly followed
# by a quote, which may make them a string prefix), whitespace and plain punctuation. Skipped in one
# step; the identifier is an atomic group, so it never backtracks into a shorter one.
_RUN = re.compile(r"(?:(?>[^\W\d][\w$]*)(?!')|[\s(),;=<>!|&%^~@:*\[\]{}?])+")
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz_$0123456789")
_IDENT = re.compile(r"[^\W\d][\w$]*")
_NUMBER = re.compile(r"0[xX][0-9A-Fa-f]*|0[bB][01]*|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_NUMBER_TAIL = re.compile(r"[\w$.]*")  # `1abc`, `1e`, `0xZZ`: swallowed with the number
_ESCAPED_BODY = {"'": re.compile(r"[^'\\]*"), '"': re.compile(r'[^"\\]*')}
_DOLLAR_TAG = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_PARAM = re.compile(r"\$[0-9]+")
_BLOCK = re.compile(r"/\*|\*/")
_DIGITS = frozenset("0123456789")
_STRING_PREFIXES = frozenset({"e", "n", "x", "b"})
_ESCAPE_PREFIXES = frozenset({"e"})
# After these words a following `-`/`+` is a sign, not a binary operator.
_UNARY_AFTER = frozenset({
    "select", "where", "and", "or", "not", "then", "else", "when", "by", "values", "in", "limit",
    "offset", "set", "between", "is", "like", "on", "return", "returning", "case", "having", "as",
})

Span = tuple[int, int, bool]  # start, end, is a literal (False: a comment)


def _string_end(sql: str, j: int, backslash: bool, quote: str = "'") -> int:
    """End (exclusive) of a quoted string whose body starts at j; len(sql) when unterminated."""
    n = len(sql)
    body = _ESCAPED_BODY[quote]
    while True:
        if backslash:
            k = body.match(sql, j).end()  # type: ignore[union-attr]  # a `*` pattern: always matches
            if k >= n:
                return n
            if sql[k] == "\\":
                j = k + 2
                if j >= n:
                    return n
                continue
        else:
            k = sql.find(quote, j)
            if k < 0:
                return n
        if k + 1 < n and sql[k + 1] == quote:  # '' doubling
            j = k + 2
            continue
        return k + 1


def _quoted_end(sql: str, j: int, quote: str) -> int:
    """End of a "quoted" or `backquoted` identifier (doubling escapes the quote); -1 when unterminated."""
    while True:
        k = sql.find(quote, j)
        if k < 0:
            return -1
        if k + 1 < len(sql) and sql[k + 1] == quote:
            j = k + 2
            continue
        return k + 1


def _block_end(sql: str, i: int) -> int:
    """End of a (possibly nested) /* */ comment opening at i; len(sql) when unterminated."""
    depth = 0
    for m in _BLOCK.finditer(sql, i):
        depth += 1 if m.group(0) == "/*" else -1
        if depth == 0:
            return m.end()
    return len(sql)


def _number_end(sql: str, i: int) -> int:
    m = _NUMBER.match(sql, i)
    end = m.end() if m else i + 1
    return _NUMBER_TAIL.match(sql, end).end()  # type: ignore[union-attr]  # `*`: always matches


def _unary_after_run(sql: str, start: int, end: int, unary: bool) -> bool:
    """Whether a sign after sql[start:end] would belong to a number (see `_UNARY_AFTER`)."""
    k = end - 1
    while k >= start and sql[k].isspace():
        k -= 1
    if k < start:
        return unary
    if sql[k].lower() not in _WORD_CHARS and not sql[k].isalnum():
        return sql[k] not in ")]}"
    j = k
    while j >= start and (sql[j].lower() in _WORD_CHARS or sql[j].isalnum()):
        j -= 1
    return sql[j + 1:k + 1].lower() in _UNARY_AFTER


def _spans(sql: str, backslash: bool) -> list[Span]:
    """Literal and comment spans of sql, scanned with backslash escapes on or off in '' strings."""
    spans: list[Span] = []
    n = len(sql)
    i = 0
    unary = True  # a sign here would belong to a number
    while i < n:
        m = _RUN.match(sql, i)
        if m:
            unary = _unary_after_run(sql, i, m.end(), unary)
            i = m.end()
            if i >= n:
                break
        c = sql[i]
        if c.isspace():
            i = _WS.match(sql, i).end()  # type: ignore[union-attr]  # sql[i] is a space: matches
            continue
        if c == "'":
            end = _string_end(sql, i + 1, backslash)
            spans.append((i, end, True))
            i, unary = end, False
            continue
        if c == '"' and backslash:  # the MySQL reading: a "string", with backslash escapes
            end = _string_end(sql, i + 1, True, '"')
            spans.append((i, end, True))
            i, unary = end, False
            continue
        if c == '"' or c == "`":
            end = _quoted_end(sql, i + 1, c)
            if end < 0:
                spans.append((i, n, True))
                break
            i, unary = end, False
            continue
        if c == "#" or (c == "-" and sql.startswith("--", i)):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            spans.append((i, end, False))
            i = end
            continue
        if c == "/" and sql.startswith("/*", i):
            end = _block_end(sql, i)
            spans.append((i, end, False))
            i = end
            continue
        if c == "$":
            m = _DOLLAR_TAG.match(sql, i)
            if m:
                close = sql.find(m.group(0), m.end())
                end = n if close < 0 else close + len(m.group(0))
                spans.append((i, end, True))
                i, unary = end, False
                continue
            m = _PARAM.match(sql, i)
            i, unary = (m.end(), False) if m else (i + 1, True)
            continue
        if c in _DIGITS or (c == "." and i + 1 < n and sql[i + 1] in _DIGITS):
            end = _number_end(sql, i)
            spans.append((i, end, True))
            i, unary = end, False
            continue
        m = _IDENT.match(sql, i)
        if m:
            word = m.group(0).lower()
            end = m.end()
            if end < n and sql[end] == "'" and word in _STRING_PREFIXES:
                end = _string_end(sql, end + 1, backslash or word in _ESCAPE_PREFIXES)
                spans.append((i, end, True))
                i, unary = end, False
                continue
            i, unary = end, word in _UNARY_AFTER
            continue
        if (c == "-" or c == "+") and unary and i + 1 < n and (
                sql[i + 1] in _DIGITS or (sql[i + 1] == "." and i + 2 < n and sql[i + 2] in _DIGITS)):
            end = _number_end(sql, i + 1)
            spans.append((i, end, True))
            i, unary = end, False
            continue
        i += 1
        unary = c not in ")]}"
    return spans


def _union(a: list[Span], b: list[Span]) -> list[Span]:
    out: list[Span] = []
    for s, e, lit in sorted(a + b):
        if out and s < out[-1][1]:
            ps, pe, plit = out[-1]
            out[-1] = (ps, max(pe, e), plit or lit)
        else:
            out.append((s, e, lit))
    return out


def mask_literals(sql: str) -> str:
    """sql with every literal replaced by `?` and every comment by one space. Never raises."""
    try:
        spans = _spans(sql, False)
        if "\\" in sql:
            spans = _union(spans, _spans(sql, True))
        if not spans:
            return sql
        out: list[str] = []
        pos = 0
        for s, e, lit in spans:
            out.append(sql[pos:s])
            out.append("?" if lit else " ")
            pos = e
        out.append(sql[pos:])
        return "".join(out)
    except Exception:  # noqa: BLE001 - a statement we cannot scan is not stored at all
        log.debug("sql masking failed", exc_info=True)
        return "?"
