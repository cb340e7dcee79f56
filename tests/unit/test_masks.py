"""Masks close their gaps: SQL literals (lexer), URL path segments, and the log scrubber's kinds.
Each known leak is asserted with its exact masked output and the secret's absence; switches off
leave text as is; random input never raises and generated secrets never survive."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.l7 import http
from agent.l7.sql import mask_literals
from agent.l7.tracer import Masks
from agent.logs.pii import Scrubber

# --- SQL -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "masked", "secret"), [
    ("SELECT 'C:\\', 'secret'", "SELECT ?", "secret"),  # backslash before the closing quote
    ("SELECT 'a\\'b', 'secret' FROM t", "SELECT ?", "secret"),  # the readings never agree again
    ("SELECT E'x\\'secret' FROM t", "SELECT ? FROM t", "secret"),
    ("SELECT 'it''s secret', 1", "SELECT ?, ?", "secret"),
    ("SELECT * FROM t WHERE pw = 'hunter2 cut by the capt", "SELECT * FROM t WHERE pw = ?", "hunter2"),
    ("SELECT $tag$hunter2 cut", "SELECT ?", "hunter2"),
    ("SELECT $q$a$b$hunter2$q$, 1", "SELECT ?, ?", "hunter2"),
    ("SELECT 0xDEADBEEF FROM t", "SELECT ? FROM t", "DEADBEEF"),
    ("SELECT .31337 FROM t", "SELECT ? FROM t", "31337"),
    ("SELECT 1e10, 2.5E-3 FROM t", "SELECT ?, ? FROM t", "1e10"),
    ("SELECT a /* hunter2 */ FROM t", "SELECT a   FROM t", "hunter2"),
    ("SELECT a /* x /* hunter2 */ y */ FROM t", "SELECT a   FROM t", "hunter2"),
    ("SELECT a /* hunter2 cut", "SELECT a  ", "hunter2"),
    ("SELECT a -- hunter2\nFROM t", "SELECT a  \nFROM t", "hunter2"),
    ("SELECT a # hunter2\nFROM t", "SELECT a  \nFROM t", "hunter2"),
    ("INSERT INTO t VALUES (N'hunter2', B'0101', X'ff00', -7)", "INSERT INTO t VALUES (?, ?, ?, ?)", "hunter2"),
    ('SELECT "a\'" FROM `t1` WHERE col_2 = $1 AND x = ?', 'SELECT "a\'" FROM `t1` WHERE col_2 = $1 AND x = ?', "?!"),
    ('SELECT "unterminated hunter2', "SELECT ?", "hunter2"),
])
def test_sql_leaks_are_closed(sql: str, masked: str, secret: str) -> None:
    out = mask_literals(sql)
    assert out == masked
    assert secret not in out


def test_sql_keeps_structure() -> None:
    assert mask_literals("SELECT t1.col_2, a-1, f(-2) FROM t1 WHERE x >= -3.5e2 AND y IN (1, 2)") == \
        "SELECT t1.col_2, a-?, f(?) FROM t1 WHERE x >= ? AND y IN (?, ?)"
    # With a backslash in the statement, "double quotes" are read as MySQL strings too: masked.
    assert mask_literals('SELECT "hunter2" FROM t WHERE p = \'a\\\'') == "SELECT ? FROM t WHERE p = ?"
    assert mask_literals('SELECT "col" FROM t WHERE p = \'a\'') == 'SELECT "col" FROM t WHERE p = ?'
    assert mask_literals("SELECT x FROM t WHERE a = _utf8'hunter2' AND d = DATE '2024-01-01'") == \
        "SELECT x FROM t WHERE a = _utf8? AND d = DATE ?"
    assert mask_literals("") == ""
    assert mask_literals("SELECT a FROM b") == "SELECT a FROM b"


_TOKEN = st.text(alphabet=string.ascii_letters + string.digits, min_size=12, max_size=12)
# Noise around the secret: quotes only as `''` (doubled) or `\\'` (escaped), backslashes only in
# those or as `\\\\`, so under the backslash-escape reading the literal stays open across it; under
# the standard reading it may close early, and then the token must still be masked.
_NOISE = st.lists(st.sampled_from(["''", "\\'", "\\\\", " ", '"', "$", "#", "--", "/*", "*/", ";", "\n", "`"]),
                  max_size=4).map("".join)


@settings(max_examples=2000, deadline=None)
@given(_TOKEN, _NOISE, _NOISE, st.sampled_from(["'", "E'", "N'", "$$", "$t$"]))
def test_generated_literal_never_survives(token: str, before: str, after: str, opener: str) -> None:
    closer = opener[-1] if opener.endswith("'") else opener
    if opener.startswith("$"):  # a `$` in the noise could close a dollar quote for real
        before, after = before.replace("$", ""), after.replace("$", "")
    for sql in (f"SELECT {opener}{before}{token}{after}{closer}",
                f"SELECT {opener}{before}{token}{after}{closer}, 1 FROM t",
                f"SELECT a FROM t WHERE b = {opener}{before}{token}{after}",  # cut by the capture
                # A literal after an ambiguous one (the readings disagree about where it ends).
                f"SELECT 'C:\\', {opener}{token}{closer}, 'x'",
                f"SELECT 'a\\'b', {opener}{token}{closer} FROM t"):
        out = mask_literals(sql)
        assert token not in out, (sql, out)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_mask_literals_never_raises(sql: str) -> None:
    assert isinstance(mask_literals(sql), str)


def test_sql_mask_is_fast_enough_on_a_full_capture() -> None:
    import time
    sql = ("SELECT id, name FROM users WHERE email = 'a\\'b' AND x = 0x1F /* c */ AND y IN (1, 2.5, .3) " * 12)[:1024]
    t0 = time.perf_counter()
    for _ in range(200):
        mask_literals(sql)
    assert (time.perf_counter() - t0) / 200 < 0.005  # far below; a quadratic scan would not be


# --- URL paths -----------------------------------------------------------------------------------

_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sflKxwRJSMeKKF2QT4fwpM"


@pytest.mark.parametrize(("path", "masked", "secret"), [
    ("/reset/Xk9fQ2aZ7bLm3nP0qR8sT1uV", "/reset/*", "Xk9fQ2aZ7bLm3nP0qR8sT1uV"),
    ("/app;jsessionid=ABC123DEF456/page", "/app;jsessionid=*/page", "ABC123DEF456"),
    ("/files/0123456789abcdef0123/raw", "/files/*/raw", "0123456789abcdef0123"),
    (f"/t/{_JWT}", "/t/*", "eyJhbGci"),
    ("/dl/aGVsbG8td29ybGQtMTIzNDU2Nzg5MA==?x=1", "/dl/*?x=*", "aGVsbG8t"),
])
def test_url_path_secrets_are_masked(path: str, masked: str, secret: str) -> None:
    req = http.parse_requests(f"GET {path} HTTP/1.1\r\n\r\n".encode())[0]
    assert req.path == masked
    assert secret not in req.path


@pytest.mark.parametrize("path", [
    "/api/users/123e4567-e89b-12d3-a456-426614174000/orders",  # UUIDs are ids: kept
    "/blog/release-notes-2023-10-01",
    "/api/v1/items/12345",
    "/static/app.bundle.js",
    "/",
])
def test_url_path_ordinary_segments_are_kept(path: str) -> None:
    assert http.mask_url_path(path) == path


def test_url_path_switch_off_and_masks_default() -> None:
    raw = b"GET /reset/Xk9fQ2aZ7bLm3nP0qR8sT1uV;jsessionid=ABC?k=v HTTP/1.1\r\n\r\n"
    assert http.parse_requests(raw, mask=False, mask_path=False)[0].path == "/reset/Xk9fQ2aZ7bLm3nP0qR8sT1uV;jsessionid=ABC?k=v"
    assert http.parse_requests(raw, mask=True, mask_path=False)[0].path == "/reset/Xk9fQ2aZ7bLm3nP0qR8sT1uV;jsessionid=ABC?k=*"
    assert http.parse_requests(raw, mask=False, mask_path=True)[0].path == "/reset/*;jsessionid=*?k=v"
    assert Masks().url_path is True and Masks(url_path=False).url_path is False


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_url_mask_never_raises(path: str) -> None:
    assert isinstance(http.mask_url_path(path), str)


# --- log scrubber --------------------------------------------------------------------------------

_AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
_GCP = "AIzaSyA1234567890abcdefghijklmnopqrstuv"


@pytest.mark.parametrize(("line", "masked", "secret"), [
    ("auth Authorization: Basic dXNlcjpwYXNzd29yZA==", "auth Authorization: Basic <token>", "dXNlcjpw"),
    ("call with Basic dXNlcjpwYXNzd29yZA== ok", "call with Basic <token> ok", "dXNlcjpw"),
    ("Proxy-Authorization: Negotiate YIIGhgYGKwYBBQUCoIIGejCCBnag", "Proxy-Authorization: Negotiate <token>", "YIIG"),
    ("Cookie: sid=s3cr3t; theme=dark", "Cookie: <secret>", "s3cr3t"),
    ("Set-Cookie: sid=s3cr3t; Path=/; HttpOnly", "Set-Cookie: <secret>", "s3cr3t"),
    ('headers={"Cookie": "sid=s3cr3t", "Accept": "*/*"}', 'headers={"Cookie": "<secret>", "Accept": "*/*"}', "s3cr3t"),
    ("X-Api-Key: k3yv4lue", "X-Api-Key: <secret>", "k3yv4lue"),
    ("x-auth-token: t0k3n", "x-auth-token: <secret>", "t0k3n"),
    ("using AKIAIOSFODNN7EXAMPLE now", "using <key> now", "AKIAIOSFODNN7EXAMPLE"),
    ("sts ASIAY34FZKBOKMUTVV7A", "sts <key>", "ASIAY34FZKBOKMUTVV7A"),
    (f"aws_secret_access_key={_AWS_SECRET}", "aws_secret_access_key=<key>", "wJalrXUtnFEMI"),
    (f"gcp key={_GCP} x", "gcp key=<key> x", "AIzaSy"),
    ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "gh <key>", "ghp_abc"),
    ("gho_abcdefghijklmnopqrstuvwxyz0123456789 ghs_abcdefghijklmnopqrstuvwxyz0123456789",
     "<key> <key>", "abcdefghij"),
    ("pat github_pat_11ABCDEFG0123456789_abcdefghij", "pat <key>", "11ABCDEFG"),
    ("slack xoxb-123456789012-abcdefABCDEF", "slack <key>", "abcdefABCDEF"),
    ("card 4111.1111.1111.1111 ok", "card <card> ok", "4111"),
    ("card 4111 1111-1111.1111 ok", "card <card> ok", "4111"),
    ("q=passwd%3Dhunter2&x=1", "q=passwd%3D<secret>&x=1", "hunter2"),
    ("q=password%3dhunter2", "q=password%3d<secret>", "hunter2"),
])
def test_scrubber_leaks_are_closed(line: str, masked: str, secret: str) -> None:
    out = Scrubber()(line)
    assert out == masked
    assert secret not in out


def test_scrubber_keeps_ordinary_text() -> None:
    s = Scrubber()
    for line in ("Basic authentication failed for user", "order 4111.1111.1111.1112 (not Luhn)",
                 "GET /api/v1/items 200 12ms", "version 1.2.3.4 released", "keyboard layout us"):
        assert s(line) == line


def test_scrubber_switches_off_leave_text_as_is() -> None:
    off = Scrubber(emails=False, cards=False, tokens=False, secrets=False, headers=False, cloud_keys=False,
                   ipv4=False)
    line = (f"Cookie: a=b bob@example.com 4111.1111.1111.1111 Basic dXNlcjpwYXNzd29yZA== "
            f"password%3Dx AKIAIOSFODNN7EXAMPLE {_GCP} 10.0.0.1")
    assert off(line) == line
    assert Scrubber(headers=False, cloud_keys=False, secrets=False)("X-Api-Key: AKIAIOSFODNN7EXAMPLE") == \
        "X-Api-Key: AKIAIOSFODNN7EXAMPLE"
    assert Scrubber(headers=False)("X-Api-Key: AKIAIOSFODNN7EXAMPLE") == "X-Api-Key: <key>"
    assert Scrubber(cloud_keys=False)("X-Api-Key: AKIAIOSFODNN7EXAMPLE") == "X-Api-Key: <secret>"
    assert Scrubber(headers=False, cloud_keys=False)("X-Api-Key: AKIAIOSFODNN7EXAMPLE") == "X-Api-Key: <secret>"
    assert Scrubber(cards=False)("4111.1111.1111.1111") == "4111.1111.1111.1111"
    assert Scrubber(tokens=False, headers=False)("Basic dXNlcjpwYXNzd29yZA==") == "Basic dXNlcjpwYXNzd29yZA=="
    assert Scrubber(secrets=False)("password%3Dx") == "password%3Dx"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_scrubber_never_raises(text: str) -> None:
    assert isinstance(Scrubber(ipv4=True)(text), str)
