"""HTTP/1.1 GET over a unix socket (the Docker Engine, Podman and CRI-O inspect APIs).

One connection per request: a lookup happens once per new container, so keeping connections
alive would save little and add a stale-connection retry that could ask twice.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass

from agent.containers.runtimes import MAX_RESPONSE, BadAnswer, RuntimeUnavailable


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    def json(self, what: str) -> object:
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise BadAnswer(f"{what}: not JSON ({e})") from None


def get(path: str, url: str, timeout: float, what: str) -> Response:
    """GET `url` from the server on unix socket `path`. Transport failures (refused, reset,
    timeout, a malformed HTTP answer) raise RuntimeUnavailable naming `what`."""
    conn = _UnixConnection(path, timeout)
    try:
        conn.request("GET", url, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read(MAX_RESPONSE + 1)
        if len(body) > MAX_RESPONSE:
            raise BadAnswer(f"{what}: answer larger than {MAX_RESPONSE} bytes")
        return Response(resp.status, body)
    except (OSError, http.client.HTTPException) as e:
        raise RuntimeUnavailable(f"{what}: {path}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()
