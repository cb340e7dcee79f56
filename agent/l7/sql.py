"""SQL literal masking: string and numeric literals become `?` before a statement is stored."""

from __future__ import annotations

import re

_LITERALS = re.compile(
    r"'(?:[^'\\]|\\.|'')*'"  # 'strings', with '' and \' escapes
    r"|\$(\w*)\$.*?\$\1\$"  # $tag$ dollar-quoted $tag$
    r"|(?<![\w$.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w$])"  # numbers, not inside identifiers
    r"|\b[xX]'[0-9a-fA-F]*'",
    re.S,
)


def mask_literals(sql: str) -> str:
    return _LITERALS.sub("?", sql)
