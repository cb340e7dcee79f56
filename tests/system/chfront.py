"""TEST-ONLY ClickHouse HTTP(S) front that executes on chDB.

A stand-in for a remote ClickHouse server, which cannot be installed on the test machines
(Debian's clickhouse-server is far too old for clickhouse-connect). It speaks the part of
ClickHouse's HTTP interface that clickhouse-connect uses — queries in the `query` parameter
or the body, Native-format inserts, compressed bodies, basic-auth or X-ClickHouse-User/Key
credentials, errors as `Code: N. DB::Exception` with X-ClickHouse-Exception-Code — and runs
each statement on an in-process chDB store. It is never part of the agent.

    python -m tests.system.chfront --port P --data DIR [--user U --password W]
                                   [--certfile F --keyfile K]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import os
import re
import shutil
import signal
import ssl
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import chdb
import cramjam

_NOT_SETTINGS = {"query", "database", "query_id", "session_id", "session_timeout", "default_format",
                 "compress", "decompress", "wait_end_of_query", "user", "password", "quota_key",
                 "send_progress_in_http_headers", "http_headers_progress_interval_ms",
                 "enable_http_compression", "client_protocol_version"}
_PASSED_SETTINGS = {"insert_deduplication_token", "readonly", "deduplicate_blocks_in_dependent_materialized_views"}
_READ = re.compile(r"\s*\(?\s*(SELECT|WITH|SHOW|DESC|DESCRIBE|EXPLAIN|EXISTS)\b", re.I)


def _decode(body: bytes, encoding: str | None) -> bytes:
    if not encoding or not body:
        return body
    if encoding == "lz4":
        return bytes(cramjam.lz4.decompress(body))
    if encoding == "zstd":
        return bytes(cramjam.zstd.decompress(body))
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return bytes(cramjam.deflate.decompress(body))
    if encoding == "br":
        return bytes(cramjam.brotli.decompress(body))
    raise ValueError(f"unsupported Content-Encoding {encoding}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--user", default="default")
    ap.add_argument("--password", default="")
    ap.add_argument("--certfile")
    ap.add_argument("--keyfile")
    args = ap.parse_args()

    conn = chdb.connect(args.data)
    # CHFRONT_LOSE_REPLIES=N: run the first N inserts, then drop the connection without an
    # answer, as a network failure after the server committed would.
    lose = [int(os.environ.get("CHFRONT_LOSE_REPLIES", "0"))]
    lock = threading.Lock()
    spill = tempfile.mkdtemp(prefix="chfront-")

    def execute(sql: str, database: str, fmt: str) -> bytes:
        with lock:
            conn.query(f"USE {database}", "CSV")
            return conn.query(sql, fmt).bytes()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def _reply(self, status: int, body: bytes, code: int | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            if code is not None:
                self.send_header("X-ClickHouse-Exception-Code", str(code))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            user, password = self.headers.get("X-ClickHouse-User"), self.headers.get("X-ClickHouse-Key")
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            return (user or "default") == args.user and (password or "") == args.password

        def do_GET(self) -> None:  # noqa: N802
            self._handle(b"")

        def do_POST(self) -> None:  # noqa: N802
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                self._handle(b"".join(parts))
            else:
                n = int(self.headers.get("Content-Length") or 0)
                self._handle(self.rfile.read(n))

        def _handle(self, body: bytes) -> None:
            url = urlsplit(self.path)
            if url.path == "/ping":
                return self._reply(200, b"Ok.\n")
            if not self._authorized():
                msg = (f"Code: 516. DB::Exception: {args.user}: Authentication failed: password is "
                       "incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)\n")
                return self._reply(401, msg.encode(), 516)
            params = dict(parse_qsl(url.query, keep_blank_values=True))
            if os.environ.get("CHFRONT_DEBUG"):
                print(self.command, params, dict(self.headers), len(body), flush=True)
            try:
                body = _decode(body, self.headers.get("Content-Encoding"))
            except Exception as e:  # noqa: BLE001
                return self._reply(400, f"Code: 1. DB::Exception: {e}\n".encode(), 1)
            settings = {k: v for k, v in params.items() if k in _PASSED_SETTINGS}
            database = params.get("database") or "default"
            m = None if "query" in params else re.match(rb"\s*INSERT\s+INTO\s.*?\sFORMAT\s+\w+\s", body, re.I | re.S)
            if m:  # the statement leads the body and the data follows it
                params["query"], body = m.group(0).decode().strip(), body[m.end():]
            try:
                if "query" in params and body:
                    out = self._insert(params["query"], body, settings, database)
                    if lose[0] > 0:
                        lose[0] -= 1
                        self.close_connection = True
                        self.connection.close()
                        return None
                else:
                    sql = params.get("query") or body.decode()
                    sql = _bind(sql, params)
                    # readonly is enforced here, not passed on: a setting given to the embedded
                    # engine stays on its one session, which the front's inserts share.
                    if settings.pop("readonly", "0") in ("1", "2") and not _READ.match(sql):
                        msg = "Code: 164. DB::Exception: Cannot execute query in readonly mode. (READONLY)\n"
                        return self._reply(500, msg.encode(), 164)
                    if settings and _READ.match(sql):
                        sql = re.sub(r"(\s+FORMAT\s+\w+)?\s*;?\s*$", lambda m: _settings_clause(settings) + (m.group(1) or ""), sql, count=1)
                    out = execute(sql, database, params.get("default_format") or "TabSeparated")
            except Exception as e:  # noqa: BLE001 - every engine error becomes ClickHouse's error reply
                text = str(e)
                m = re.search(r"Code: (\d+)", text)
                return self._reply(500, (text.strip() + "\n").encode(), int(m.group(1)) if m else 1)
            self._reply(200, out)

        def _insert(self, query: str, data: bytes, settings: dict[str, str], database: str) -> bytes:
            m = re.match(r"\s*INSERT\s+INTO\s+(\S+)\s*(\([^)]*\))?\s*FORMAT\s+(\w+)\s*$", query, re.I | re.S)
            if not m:
                raise ValueError(f"Code: 62. DB::Exception: the test front cannot run {query[:80]!r}")
            table, cols, fmt = m.group(1), m.group(2) or "", m.group(3)
            fd, path = tempfile.mkstemp(dir=spill, suffix="." + fmt.lower())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                sql = f"INSERT INTO {table} {cols}{_settings_clause(settings)} SELECT * FROM file('{path}', '{fmt}')"
                return execute(sql, database, "TabSeparated")
            finally:
                os.unlink(path)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.certfile:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.certfile, args.keyfile)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"chfront listening on {args.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the fixture stops it so: clean up below
    try:
        server.serve_forever()
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _bind(sql: str, params: dict[str, str]) -> str:
    """Server-side query parameters ({name:Type} with param_name=...)."""
    def sub(m: re.Match[str]) -> str:
        value = params.get("param_" + m.group(1))
        if value is None:
            return m.group(0)
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return re.sub(r"\{(\w+):[^}]+\}", sub, sql)


def _settings_clause(settings: dict[str, str]) -> str:
    if not settings:
        return ""
    parts = []
    for k, v in settings.items():
        parts.append(f"{k}={v}" if v.isdigit() else f"{k}='{v}'")
    return " SETTINGS " + ", ".join(parts)


if __name__ == "__main__":
    main()
