"""`coroot-agent query`: read-only SQL against the configured store.

While a running agent holds the embedded store (it keeps a lock file in storage.path), the
query goes through that agent's /api/query; otherwise this process opens the store itself.
Remote stores are queried directly. Two guards: a statement must start with a read keyword,
and the store runs it with readonly=1.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO

from agent.config import Config

READ_KEYWORDS = ("SELECT", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "WITH", "EXISTS")
FORMATS = {"tsv": "TSVWithNames", "json": "JSONEachRow"}
LOCK_NAME = "agent.lock"


class QueryRefused(Exception):
    """Not a read-only query, or not one this command can run; the message says why."""


def check_read_only(sql: str) -> str:
    """Return the statement without a trailing ';' if it is a single read; raise otherwise."""
    text = re.sub(r"--[^\n]*|/\*.*?\*/", " ", sql, flags=re.S).strip()
    text = re.sub(r";\s*$", "", text)
    if not text:
        raise QueryRefused("empty query")
    if ";" in re.sub(r"'(?:[^'\\]|\\.)*'", "''", text):
        raise QueryRefused("one statement at a time, please")
    word = re.match(r"[(\s]*([A-Za-z]+)", text)
    first = word.group(1).upper() if word else ""
    if first not in READ_KEYWORDS:
        raise QueryRefused(
            f"only read queries are allowed (SELECT, SHOW, DESCRIBE, EXPLAIN, WITH, EXISTS); "
            f"refused {first or 'this statement'}")
    if re.search(r"\bINTO\s+OUTFILE\b", text, re.I):
        raise QueryRefused("INTO OUTFILE is not allowed: the query would write a file")
    return text


# ----------------------------------------------------------------- the lock ---


@dataclass
class StoreLock:
    """Held by the agent that has the embedded store open; tells `query` where to ask."""

    path: str
    fd: int = -1

    @classmethod
    def for_config(cls, cfg: Config) -> StoreLock:
        return cls(os.path.join(cfg.storage_path, LOCK_NAME))

    def acquire(self, info: dict[str, object]) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self.fd = fd
        return True

    def holder(self) -> dict[str, object] | None:
        """What the current holder wrote, or None when nobody holds the lock."""
        if not os.path.exists(self.path):
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # nobody holds it
            except BlockingIOError:
                pass
            data = os.read(fd, 4096)
            try:
                return json.loads(data) if data else {}
            except ValueError:
                return {}
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- the command --


def run(cfg: Config, sql: str, fmt: str, out: IO[bytes]) -> None:
    """Run `sql` and write its result to `out`. Raises QueryRefused or StoreError."""
    from agent.sinks.store import Store, StoreError

    stmt = check_read_only(sql)
    if fmt not in FORMATS:
        raise QueryRefused(f"--format must be one of {', '.join(FORMATS)}")
    if cfg.embedded_store:
        lock = StoreLock.for_config(cfg)
        holder = lock.holder()
        if holder is not None:
            out.write(_via_agent(holder, cfg, stmt, fmt))
            return
        if not lock.acquire({"pid": os.getpid(), "query": True}):
            raise StoreError(f"the store at {cfg.storage_path} is busy; try again")
        try:
            store = Store(cfg)
            if not os.path.isdir(store.chdb_path):
                raise StoreError(f"no store at {store.chdb_path}: no agent has written there yet "
                                 "(check --storage-path)")
            try:
                out.write(store.query(stmt, FORMATS[fmt]))
            finally:
                store.close()
        finally:
            lock.release()
        return
    store = Store(cfg)
    try:
        out.write(store.query(stmt, FORMATS[fmt]))
    finally:
        store.close()


def _via_agent(holder: dict[str, object], cfg: Config, stmt: str, fmt: str) -> bytes:
    from agent.sinks.store import StoreError

    listen = str(holder.get("listen") or cfg.listen)
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/api/query?format={fmt}"
    req = urllib.request.Request(url, data=stmt.encode(), method="POST")
    if cfg.api_key:
        req.add_header("X-Api-Key", cfg.api_key)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", "")
        except ValueError:
            msg = ""
        if e.code == 400:
            raise QueryRefused(msg or "refused by the agent") from None
        raise StoreError(f"the running agent (pid {holder.get('pid')}) answered {e.code}: {msg}") from None
    except OSError as e:
        raise StoreError(f"the running agent (pid {holder.get('pid')}) holds the store but its API at "
                         f"{url} does not answer: {e}") from None


def api_handler(store: object):  # noqa: ANN201 - returns an ApiHandler
    """/api/query for a running agent: POST the SQL, ?format=tsv|json."""
    from urllib.parse import parse_qs

    from agent.api.server import Response
    from agent.sinks.store import StoreError

    def handle(query: str, body: bytes) -> Response:
        fmt = (parse_qs(query).get("format") or ["tsv"])[0]
        try:
            stmt = check_read_only(body.decode(errors="replace"))
            if fmt not in FORMATS:
                raise QueryRefused(f"format must be one of {', '.join(FORMATS)}")
            data = store.query(stmt, FORMATS[fmt])  # type: ignore[attr-defined]
        except QueryRefused as e:
            return Response(400, json.dumps({"error": str(e)}).encode() + b"\n")
        except StoreError as e:
            return Response(502, json.dumps({"error": str(e)}).encode() + b"\n")
        ctype = "text/tab-separated-values" if fmt == "tsv" else "application/x-ndjson"
        return Response(200, data, ctype)

    return handle
