"""The CLI's errors: one first line that says what is wrong and what to do; tracebacks only with --debug."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from edgescope.cli import main


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_no_server_at_the_target_says_so_and_how_to_fix_it() -> None:
    target = f"127.0.0.1:{_free_port()}"
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "models", "--target", target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    first = run.stderr.splitlines()[0]
    assert first.startswith(f"edgescope models: error: no server answers at {target}")
    assert "edgescope serve" in first and "--target" in first
    assert "Traceback" not in run.stderr


def test_an_unexpected_error_is_one_line_unless_debugging(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import edgescope.runtime.client.top as top

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the terminal went away\nsecond line of detail")

    monkeypatch.setattr(top, "run_top", broken)
    assert main(["top", "--count", "1"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "edgescope top: error: unexpected RuntimeError: the terminal went away "
        "(rerun with --debug for the full traceback, and report it)"
    ]
    assert main(["--debug", "top", "--count", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "second line of detail" in err
    assert err.splitlines()[-1].startswith("edgescope top: error: unexpected RuntimeError")
