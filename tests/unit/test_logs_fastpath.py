"""The quote/bracket stripping's fast path (no opener in the line) gives what the full walk gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.logs.patterns import _OPEN, _outside_quotes_and_brackets, pattern_words


def _reference(s: str) -> str:
    """The character walk as it was before the fast path (kept here as the reference)."""
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


CORPUS = [
    "", "plain line with words", "ERROR request 12 took 3 ms", "closing ] only ) and } here",
    "a [b] c", "x (y (z)) w", 'say "hi there" ok', "it's open", 'esc \\"q\\" x', "{json: 1}",
    "0x1f 123e4567-e89b-12d3-a456-426614174000 deadbeef", "tail ]", "a" * 10_000,
]


def test_corpus_identical() -> None:
    for s in CORPUS:
        assert _outside_quotes_and_brackets(s) == _reference(s)


@settings(max_examples=500)
@given(st.text(alphabet=st.sampled_from(list("ab 1x[](){}\"'\\\n\t-_.:=@")), max_size=200) | st.text(max_size=200))
def test_random_identical(s: str) -> None:
    assert _outside_quotes_and_brackets(s) == _reference(s)
    pattern_words(s)  # never raises
