"""Fixtures every system test shares, and the only place they are defined: the module's
`agent`, `agent_factory` for a test's own agents, and `cgroups`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system.helpers import (
    AGENT_DEFAULTS,
    AGENT_LOGS,
    AGENT_STORES,
    AgentFactory,
    AgentProcess,
    TestCgroups,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "agent_args(*args): flags the module's `agent` runs with, after AGENT_DEFAULTS "
                   "(set as the module's pytestmark)")
    config.addinivalue_line(
        "markers", "agent_without(*parts): the module's (or test's: the closest marker wins) agents "
                   "run without these probe families, which its tests do not look at: 'profiling', "
                   "'l7'. Each costs seconds of BPF compilation at every agent start")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/system/" in str(item.fspath):
            item.add_marker(pytest.mark.system)


_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Where the suite's time goes, by module (set-up, calls and teardown together): the
    suite has a 30-minute budget on 2 cores, and a module's agents and servers are its cost."""
    if not _MODULE_SECONDS:
        return
    total = sum(_MODULE_SECONDS.values())
    terminalreporter.section(f"time by module ({total / 60:.1f} min in all)")
    for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s  {module}")


@pytest.fixture(scope="session", autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("system tests need root, the real kernel and BPF: run `make test` as root")


@pytest.fixture(scope="session", autouse=True)
def _agent_logs() -> None:
    """Agent logs and stores of earlier test runs that are over go (a run still going, e.g.
    another engineer's, keeps its own; one whose pid this run now has is over); this run's stay
    after it, for reading."""
    for top in (AGENT_LOGS, AGENT_STORES):
        for run in os.listdir(top) if os.path.isdir(top) else ():
            if not (run.isdigit() and os.path.exists(f"/proc/{run}")) or run == str(os.getpid()):
                shutil.rmtree(os.path.join(top, run), ignore_errors=True)


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


WITHOUT_FLAGS = {"profiling": "--disable-profiling", "l7": "--disable-l7-tracing"}


def _without(node: pytest.Item | pytest.Collector) -> list[str]:
    """The flags of the closest `agent_without` marker: a module's agents skip compiling the
    probe families its tests never read (about 5 s for the profiler and 12 s for L7 of the
    16 s an agent takes to start here), which is most of what the suite spends."""
    marker = node.get_closest_marker("agent_without")
    if marker is None:
        return []
    unknown = set(marker.args) - WITHOUT_FLAGS.keys()
    if unknown:
        raise pytest.UsageError(f"agent_without: unknown part(s) {sorted(unknown)}; known: {sorted(WITHOUT_FLAGS)}")
    return [WITHOUT_FLAGS[p] for p in marker.args]


@pytest.fixture(scope="module")
def agent(request: pytest.FixtureRequest) -> Iterator[AgentProcess]:
    """One agent for the whole module, started once: AGENT_DEFAULTS plus the module's
    `pytestmark = pytest.mark.agent_args(...)`. Stopped, and its storage removed, after the
    module's last test."""
    marker = request.node.get_closest_marker("agent_args")
    a = AgentProcess([*AGENT_DEFAULTS, *_without(request.node), *(marker.args if marker else ())])
    try:
        a.start()
        yield a
    finally:
        a.cleanup()


@pytest.fixture
def agent_factory(request: pytest.FixtureRequest) -> Iterator[AgentFactory]:
    """`agent_factory(*args, prefix=(), listen_host=..., defaults=True, start=True)`: an agent
    of the test's own (AGENT_DEFAULTS first unless defaults=False), started unless start=False;
    every one is stopped and its storage removed when the test ends. The closest
    `agent_without` marker's flags come after the defaults, before `args`."""
    made: list[AgentProcess] = []
    without = _without(request.node)

    def make(*args: str, defaults: bool = True, start: bool = True, **kw: object) -> AgentProcess:
        a = AgentProcess([*(AGENT_DEFAULTS if defaults else ()), *without, *args], **kw)  # type: ignore[arg-type]
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
