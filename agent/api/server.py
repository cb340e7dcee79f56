"""The agent's HTTP API: /metrics (prometheus-client exposition of the agent's own registry),
/healthz, and /api/* routes that other modules register (guarded: loopback clients, or the
API key in X-Api-Key). Serves; collects nothing itself.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


ApiHandler = Callable[[str, bytes], Response]  # (query string, body) -> response


class ApiServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, api_key: str = "",
                 health: Callable[[], tuple[bool, str]] | None = None) -> None:
        self.registry = registry
        self.api_key = api_key
        self.health = health or (lambda: (True, "ok"))
        self.routes: dict[str, ApiHandler] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("%s " + fmt, self.client_address[0], *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server._dispatch(self, b"")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                server._dispatch(self, self.rfile.read(min(length, 1 << 20)))

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    def route(self, path: str, handler: ApiHandler) -> None:
        if not path.startswith("/api/"):
            raise ValueError("routes live under /api/")
        self.routes[path] = handler

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever: only if it runs
            self._httpd.shutdown()
            self._thread = None
        self._httpd.server_close()

    def _authorized(self, req: BaseHTTPRequestHandler) -> bool:
        try:
            if ipaddress.ip_address(req.client_address[0]).is_loopback:
                return True
        except ValueError:
            pass
        key = req.headers.get("X-Api-Key") or ""
        return bool(self.api_key) and hmac.compare_digest(key.encode(), self.api_key.encode())

    def _dispatch(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        url = urlsplit(req.path)
        try:
            if url.path == "/metrics" and req.command == "GET":
                resp = Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
            elif url.path == "/healthz":
                ok, msg = self.health()
                resp = Response(200 if ok else 503, (msg + "\n").encode(), "text/plain")
            elif url.path in self.routes:
                if not self._authorized(req):
                    resp = Response(401, b'{"error": "an X-Api-Key header with the agent\'s API key is required"}\n')
                else:
                    resp = self.routes[url.path](url.query, body)
            else:
                resp = Response(404, b"not found\n", "text/plain")
        except Exception:  # noqa: BLE001 - a broken handler must not kill the server
            log.exception("serving %s", url.path)
            resp = Response(500, b"internal error\n", "text/plain")
        req.send_response(resp.status)
        req.send_header("Content-Type", resp.content_type)
        req.send_header("Content-Length", str(len(resp.body)))
        req.end_headers()
        req.wfile.write(resp.body)
