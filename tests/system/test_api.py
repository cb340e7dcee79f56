"""The agent's HTTP API from another host (a network namespace joined to this one by veth) and
from this one: /metrics and /healthz are open, /api/* needs the API key on every TCP listener
(loopback included), and the unix socket serves root without one; a client that hangs up
mid-response leaves no traceback."""

from __future__ import annotations

import os
import stat

import pytest

from tests.system.helpers import AgentFactory, RemoteHost, hang_up_mid_response, http_request

pytestmark = pytest.mark.agent_without("profiling", "l7")  # tests/system/conftest.py: families its tests never read


def test_api_needs_the_key_from_other_hosts_and_from_loopback_and_not_on_the_socket(
        agent_factory: AgentFactory) -> None:
    peer = RemoteHost(202)
    try:
        a = agent_factory("--api-key", "s3cret-key", defaults=False, listen_host="0.0.0.0")

        def status(path: str, key: str = "") -> int:
            return http_request(f"http://{peer.host_ip}:{a.port}{path}", key=key, prefix=peer.argv())[0]

        def local_status(path: str, key: str = "") -> int:
            return http_request(f"http://127.0.0.1:{a.port}{path}", key=key)[0]

        assert status("/metrics") == 200
        assert status("/healthz") == 200
        assert status("/api/processes") == 401
        assert status("/api/processes", "wrong") == 401
        assert status("/api/processes", "s3cret-key") == 200
        # Loopback is not trust: the same answers on 127.0.0.1.
        assert local_status("/api/processes") == 401
        assert local_status("/api/processes", "wrong") == 401
        assert local_status("/api/processes", "s3cret-key") == 200
        assert a.processes() != []  # the unix socket: root needs no key
    finally:
        peer.cleanup()


def test_without_a_key_the_tcp_api_is_closed_and_the_socket_is_roots(agent_factory: AgentFactory) -> None:
    a = agent_factory(defaults=False)
    url = f"http://127.0.0.1:{a.port}"
    assert http_request(f"{url}/api/processes")[0] == 403
    assert http_request(f"{url}/metrics")[0] == 200
    st = os.stat(a.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert a.processes() != []
    assert a.stop() == 0
    assert not os.path.exists(a.socket)


def test_a_client_that_hangs_up_mid_response_leaves_no_traceback(agent_factory: AgentFactory) -> None:
    a = agent_factory(defaults=False)
    for path in ("/metrics", "/healthz"):
        hang_up_mid_response(a.port, path, n=20)
    assert a.get("/healthz")  # still serving
    log = a.log()
    assert "Traceback" not in log and "BrokenPipeError" not in log and "ConnectionResetError" not in log, log[-3000:]
