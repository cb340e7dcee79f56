"""Line formats of container runtimes and the joining of multi-line records. Pure.

- CRI (`/var/log/pods/<ns>_<pod>_<uid>/<container>/N.log`): `<RFC3339Nano> <stream> <P|F> <msg>`,
  P = partial (joined with the following lines up to the next F);
- Docker json-file: `{"log": "...\\n", "stream": "stdout", "time": "..."}`, a log without its
  trailing newline is partial;
- plain lines;
and the multi-line joiner: a line that continues a record (indented, `at ...`, `Caused by:`,
`... N more`) is appended to the previous one; a record is complete at the next record's first
line or after a short quiet time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

_CRI = re.compile(r"^(\S+) (stdout|stderr) ([PF]) ?(.*)$", re.S)
_CONTINUATION = re.compile(r"^(\s+\S|\s*at [\w$.<>/]+|Caused by:|\s*\.\.\. \d+ (more|common frames omitted))")


def parse_time_ns(text: str) -> int | None:
    """RFC 3339 with up to nanoseconds -> ns since the epoch."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        return None
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        base = datetime.fromisoformat(m.group(1) + tz)
    except ValueError:
        return None
    frac = (m.group(2) or "").ljust(9, "0")
    return int(base.timestamp()) * 1_000_000_000 + int(frac)


@dataclass
class Line:
    text: str
    ts_ns: int | None = None
    stream: str = ""


@dataclass
class PartialJoiner:
    """Joins CRI P-lines / Docker newline-less pieces into whole lines."""

    parts: list[str] = field(default_factory=list)

    def cri(self, raw: str) -> Line | None:
        m = _CRI.match(raw)
        if not m:
            return Line(raw)  # not CRI after all: keep the line
        self.parts.append(m.group(4))
        if m.group(3) == "P":
            return None
        text, self.parts = "".join(self.parts), []
        return Line(text, parse_time_ns(m.group(1)), m.group(2))

    def docker(self, raw: str) -> Line | None:
        try:
            obj = json.loads(raw)
            log = obj["log"]
        except (ValueError, KeyError, TypeError):
            return Line(raw)
        if not isinstance(log, str):
            return Line(raw)
        self.parts.append(log)
        if not log.endswith("\n"):
            return None
        text, self.parts = "".join(self.parts).rstrip("\n"), []
        return Line(text, parse_time_ns(str(obj.get("time", ""))), str(obj.get("stream", "")))


@dataclass
class MultilineJoiner:
    """Joins continuation lines into the record before them; `emit` gets whole records."""

    emit: Callable[[Line], None]
    timeout: float = 0.5
    max_lines: int = 500
    current: Line | None = None
    lines: int = 0
    since: float = 0.0

    def feed(self, line: Line, now: float) -> None:
        if self.current is not None and _CONTINUATION.match(line.text) and self.lines < self.max_lines:
            self.current.text += "\n" + line.text
            self.lines += 1
            self.since = now
            return
        self.flush()
        self.current, self.lines, self.since = line, 1, now

    def tick(self, now: float) -> None:
        if self.current is not None and now - self.since >= self.timeout:
            self.flush()

    def flush(self) -> None:
        if self.current is not None:
            rec, self.current = self.current, None
            self.emit(rec)
