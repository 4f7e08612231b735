"""The deploy files name commands, flags and paths that exist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))


def _serve_flags() -> set[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(re.findall(r"--[a-z][a-z-]+", help_text))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_copy_real_paths_and_use_real_flags(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.*\])$", text, flags=re.MULTILINE)
    command = json.loads(entrypoint)
    assert command[:2] == ["edgescope", "serve"]
    flags = {word for word in command if word.startswith("--")}
    assert flags <= _serve_flags(), flags - _serve_flags()


def test_systemd_unit_uses_real_flags() -> None:
    unit = (ROOT / "deploy" / "systemd" / "edgescope.service").read_text()
    exec_start = unit.split("ExecStart=", 1)[1].split("\n#", 1)[0].replace("\\\n", " ")
    flags = set(re.findall(r"--[a-z][a-z-]+", exec_start))
    assert flags and flags <= _serve_flags()
