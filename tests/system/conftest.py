"""Fixtures every system test shares, and the only place they are defined: the module's
`agent`, `agent_factory` for a test's own agents, and `cgroups`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests.system.helpers import AGENT_DEFAULTS, AGENT_LOGS, AgentFactory, AgentProcess, TestCgroups


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "agent_args(*args): flags the module's `agent` runs with, after AGENT_DEFAULTS "
                   "(set as the module's pytestmark)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/system/" in str(item.fspath):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session", autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("system tests need root, the real kernel and BPF: run `make test` as root")


@pytest.fixture(scope="session", autouse=True)
def _agent_logs() -> None:
    """Agent logs of earlier test runs that are over go (a run still going, e.g. another
    engineer's, keeps its own); this run's stay after it, for reading."""
    for run in os.listdir(AGENT_LOGS) if os.path.isdir(AGENT_LOGS) else ():
        if not (run.isdigit() and os.path.exists(f"/proc/{run}")):
            shutil.rmtree(os.path.join(AGENT_LOGS, run), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _private_libssl() -> Iterator[None]:
    """Every process the tests start (agents, `check`, servers, clients) loads a private copy of
    the system's libssl (LD_LIBRARY_PATH), a file of its own: the agents under test put their
    OpenSSL uprobes on it, not on the host's libssl, where they would fire in every process of
    the host, and where another tracer's uprobes (one made with a USDT reference counter, which
    the kernel can leak until reboot) would make ours fail. The tests that copy libssl
    themselves copy the system's file, not this one."""
    found = subprocess.run(["sh", "-c", "ldconfig -p | awk '/libssl.so.3 .*x86-64/{print $NF; exit}'"],
                           capture_output=True, text=True).stdout.strip()
    if not found:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="ca-libssl-") as d:
        os.chmod(d, 0o755)  # the tests' unprivileged processes load it too
        shutil.copy(found, os.path.join(d, "libssl.so.3"))
        before = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = d + (f":{before}" if before else "")
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("LD_LIBRARY_PATH", None)
            else:
                os.environ["LD_LIBRARY_PATH"] = before


@pytest.fixture(scope="module")
def agent(request: pytest.FixtureRequest) -> Iterator[AgentProcess]:
    """One agent for the whole module, started once: AGENT_DEFAULTS plus the module's
    `pytestmark = pytest.mark.agent_args(...)`. Stopped, and its storage removed, after the
    module's last test."""
    marker = request.node.get_closest_marker("agent_args")
    a = AgentProcess([*AGENT_DEFAULTS, *(marker.args if marker else ())])
    try:
        a.start()
        yield a
    finally:
        a.cleanup()


@pytest.fixture
def agent_factory() -> Iterator[AgentFactory]:
    """`agent_factory(*args, prefix=(), listen_host=..., defaults=True, start=True)`: an agent
    of the test's own (AGENT_DEFAULTS first unless defaults=False), started unless start=False;
    every one is stopped and its storage removed when the test ends."""
    made: list[AgentProcess] = []

    def make(*args: str, defaults: bool = True, start: bool = True, **kw: object) -> AgentProcess:
        a = AgentProcess([*(AGENT_DEFAULTS if defaults else ()), *args], **kw)  # type: ignore[arg-type]
        made.append(a)
        if start:
            a.start()
        return a

    yield make
    for a in made:
        a.cleanup()


@pytest.fixture
def cgroups() -> Iterator[TestCgroups]:
    t = TestCgroups()
    yield t
    t.cleanup()
