"""PII scrubber for log bodies, on by default before anything is stored. Kinds, each a switch:
  - emails: e-mail addresses -> `<email>`;
  - cards: card numbers, digits grouped by spaces, dashes or dots in any mix, Luhn-checked -> `<card>`;
  - tokens: `Bearer ...` and `Basic <base64>` credentials -> `<token>`, JWTs -> `<jwt>`;
  - secrets: `password=`/`secret=`/`token:`-style values, also URL-encoded (`password%3D...`) -> `<secret>`;
  - headers: values of Authorization, Proxy-Authorization, Cookie, Set-Cookie, X-Api-Key and
    X-Auth-Token to the end of the line or the closing quote -> `<secret>` (an auth scheme word
    such as `Bearer` is kept, the rest becomes `<token>`);
  - cloud_keys: AWS access key ids and `aws_secret_access_key=...`, GCP `AIza...` API keys,
    GitHub `ghp_`/`gho_`/`ghs_`/`ghu_`/`ghr_`/`github_pat_` tokens, Slack `xox?-` tokens -> `<key>`;
  - ipv4 (off by default): IPv4 addresses -> `<ip>`.
Each kind becomes a fixed marker, so the log pattern of a line is the same before and after
masking. Cheap substring pre-checks keep the common line (none of these) fast: one lower-casing,
one hint search, and two digit/`@` checks. Pure; must not raise on any text."""

from __future__ import annotations

import re
from dataclasses import dataclass

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\b")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
_BASIC = re.compile(r"(?i)\b(basic)\s+([A-Za-z0-9+/]{8,}={0,2})")
_SECRET_KV = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|client[_-]?secret)"
    r"(\"?\s*(?:[=:]|%(?:25)?3d|%(?:25)?3a)\s*\"?)"
    r"(?!<(?:key|token|jwt)>)([^\s\"',;&]+)")  # a value another kind already masked keeps its marker
_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization|set-cookie|cookie|x-api-key|x-auth-token)(['\"]?\s*[:=]\s*)"
    r"(?:(?P<dq>\")|(?P<sq>')|)(?:(bearer|basic|digest|negotiate|token|aws4-hmac-sha256)\s+)?"
    r"(?(dq)[^\r\n\"]+|(?(sq)[^\r\n']+|[^\r\n]+))")
_AWS_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
_AWS_SECRET = re.compile(r"(?i)\b(aws_secret_access_key)(\"?\s*[=:]\s*\"?)[A-Za-z0-9/+=]{16,}")
_GCP = re.compile(r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])")
_GITHUB = re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,})")
_SLACK = re.compile(r"\bxox[bpars]-[A-Za-z0-9-]{10,}")
_CARD = re.compile(r"\b(?:\d[ .-]?){12,18}\d\b")
# One search over the lower-cased line decides whether any of tokens/secrets/headers/cloud_keys
# can match at all.
_HINT = re.compile(r"eyj|bearer|basic|pass|pwd|secret|token|key|authoriz|cookie|akia|asia|ag[pa]a|aida|aroa"
                   r"|an[pv]a|aipa|aiza|gh[pousr]_|github_pat_|xox")
_SECRET_HINT = re.compile(r"pass|pwd|secret|token|key")
_HEADER_HINT = re.compile(r"authoriz|cookie|x-api-key|x-auth-token")
_CLOUD_HINT = re.compile(r"akia|asia|ag[pa]a|aida|aroa|an[pv]a|aipa|aws_secret|aiza|gh[pousr]_|github_pat_|xox")
_DIGITS13 = re.compile(r"\d(?:[ .-]?\d){12}")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_NON_DIGIT = re.compile(r"\D")
_BASE64_SIGN = re.compile(r"[0-9+/=]|.[A-Z]")  # tells `dXNlcjpw...` from a word like `authentication`


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


def _header(m: re.Match[str]) -> str:
    head = m.group(1) + m.group(2) + (m.group("dq") or m.group("sq") or "")
    scheme = m.group(5)
    return f"{head}{scheme} <token>" if scheme else f"{head}<secret>"


def _basic(m: re.Match[str]) -> str:
    return f"{m.group(1)} <token>" if _BASE64_SIGN.search(m.group(2)) else m.group(0)


def _card(m: re.Match[str]) -> str:
    digits = _NON_DIGIT.sub("", m.group(0))
    return "<card>" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group(0)


@dataclass(frozen=True)
class Scrubber:
    emails: bool = True
    cards: bool = True
    tokens: bool = True
    secrets: bool = True
    headers: bool = True
    cloud_keys: bool = True
    ipv4: bool = False

    def __call__(self, text: str) -> str:
        # Cheap checks first: most lines hold none of these, and skip the regexes.
        low = text.lower()
        if _HINT.search(low):
            if self.headers and _HEADER_HINT.search(low):
                text = _HEADER.sub(_header, text)
            if self.cloud_keys and _CLOUD_HINT.search(low):
                text = _AWS_ID.sub("<key>", text)
                text = _AWS_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}<key>", text)
                text = _GCP.sub("<key>", text)
                text = _GITHUB.sub("<key>", text)
                text = _SLACK.sub("<key>", text)
            if self.tokens:
                if "eyj" in low:
                    text = _JWT.sub("<jwt>", text)
                if "bearer" in low:
                    text = _BEARER.sub(lambda m: f"{m.group(1)} <token>", text)
                if "basic" in low:
                    text = _BASIC.sub(_basic, text)
            if self.secrets and _SECRET_HINT.search(low):
                text = _SECRET_KV.sub(lambda m: f"{m.group(1)}{m.group(2)}<secret>", text)
        if self.emails and "@" in text:
            text = _EMAIL.sub("<email>", text)
        if self.cards and _DIGITS13.search(text):
            text = _CARD.sub(_card, text)
        if self.ipv4:
            text = _IPV4.sub("<ip>", text)
        return text
