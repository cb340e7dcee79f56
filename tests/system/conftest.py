"""System tests: root, the real kernel, real BPF. CI runs them as root; they never skip —
without root they fail and say why."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.system.helpers import AgentProcess, TestCgroups


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/system/" in str(item.fspath):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session", autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("system tests need root, the real kernel and BPF: run `make test` as root")


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    a = AgentProcess(["--min-container-age", "0s", "--dead-container-ttl", "3s"])
    a.start()
    yield a
    a.stop()


@pytest.fixture
def cgroups() -> Iterator[TestCgroups]:
    t = TestCgroups()
    yield t
    t.cleanup()
