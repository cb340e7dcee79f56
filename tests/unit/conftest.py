"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.l7_helpers import build_detector


@pytest.fixture(scope="session")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel's L7 detectors built once for the run (tests/unit/native/l7_detect.c)."""
    return build_detector(tmp_path_factory.mktemp("l7"))
