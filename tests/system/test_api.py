"""The agent's HTTP API from another host (a network namespace joined to this one by veth) and
from this one: /metrics and /healthz are open, /api/* needs the API key on every TCP listener
(loopback included), and the unix socket serves root without one."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

from tests.system.helpers import AgentProcess, RemoteHost

CLIENT = """
import sys, urllib.request, urllib.error
url, key = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, headers={"X-Api-Key": key} if key else {})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
"""


def local_status(port: int, path: str, key: str = "") -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"X-Api-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_api_needs_the_key_from_other_hosts_and_from_loopback_and_not_on_the_socket() -> None:
    peer = RemoteHost(202)
    a = AgentProcess(["--api-key", "s3cret-key"])
    a.args[1] = f"0.0.0.0:{a.port}"  # listen on every address
    try:
        a.start()

        def status(path: str, key: str = "") -> int:
            r = subprocess.run(peer.argv(sys.executable, "-c", CLIENT, f"http://{peer.host_ip}:{a.port}{path}", key),
                               capture_output=True, text=True, timeout=30)
            return int(r.stdout.strip())

        assert status("/metrics") == 200
        assert status("/healthz") == 200
        assert status("/api/processes") == 401
        assert status("/api/processes", "wrong") == 401
        assert status("/api/processes", "s3cret-key") == 200
        # Loopback is not trust: the same answers on 127.0.0.1.
        assert local_status(a.port, "/api/processes") == 401
        assert local_status(a.port, "/api/processes", "wrong") == 401
        assert local_status(a.port, "/api/processes", "s3cret-key") == 200
        assert a.processes() != []  # the unix socket: root needs no key
    finally:
        a.stop()
        peer.cleanup()


def test_without_a_key_the_tcp_api_is_closed_and_the_socket_is_roots() -> None:
    import os
    import stat

    a = AgentProcess()
    a.start()
    try:
        assert local_status(a.port, "/api/processes") == 403
        assert local_status(a.port, "/metrics") == 200
        st = os.stat(a.socket)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        assert a.processes() != []
    finally:
        assert a.stop() == 0
    assert not os.path.exists(a.socket)
