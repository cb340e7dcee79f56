"""journald for systemd services: `journalctl --follow --output=json --lines=0` in a child
process, each entry attributed to the service's container (`/system.slice/<unit>`) by
_SYSTEMD_UNIT, with its PRIORITY as the level. Decodes; the collector does the rest."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.logs.patterns import level_of_priority

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JournalEntry:
    container_id: str
    ts_ns: int
    level: str
    message: str


def parse_entry(line: str) -> JournalEntry | None:
    """One line of `journalctl -o json`; None for entries of no service, or garbage."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    unit = obj.get("_SYSTEMD_UNIT")
    if not isinstance(unit, str) or not unit.endswith(".service"):
        return None
    slice_ = obj.get("_SYSTEMD_SLICE") if isinstance(obj.get("_SYSTEMD_SLICE"), str) else "system.slice"
    msg = obj.get("MESSAGE")
    if isinstance(msg, list):  # journald sends binary messages as byte arrays
        msg = bytes(b for b in msg if isinstance(b, int) and 0 <= b < 256).decode("utf-8", errors="replace")
    if not isinstance(msg, str):
        return None
    try:
        ts_ns = int(obj.get("__REALTIME_TIMESTAMP", 0)) * 1000
        level = level_of_priority(int(obj.get("PRIORITY", -1)))
    except (TypeError, ValueError):
        return None
    return JournalEntry(f"/{slice_}/{unit}", ts_ns, level, msg)


class JournalFollower:
    def __init__(self, on_entry: Callable[[JournalEntry], None]) -> None:
        self.on_entry = on_entry
        self.proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        exe = shutil.which("journalctl")
        if exe is None:
            log.info("no journalctl: journald logs are not collected")
            return False
        self.proc = subprocess.Popen([exe, "--follow", "--output=json", "--lines=0", "--all", "--quiet"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, name="journald", daemon=True)
        self._thread.start()
        return True

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            entry = parse_entry(line)
            if entry is not None:
                try:
                    self.on_entry(entry)
                except Exception:  # noqa: BLE001
                    log.exception("journald entry")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
