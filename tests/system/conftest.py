"""Fixtures every system test shares, and the only place they are defined: the module's
`agent`, `agent_factory` for a test's own agents, and `cgroups`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.system.helpers import AGENT_DEFAULTS, AgentFactory, AgentProcess, TestCgroups


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
