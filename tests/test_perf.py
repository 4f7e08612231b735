"""`edgescope perf` against a real server on loopback, with tiny sweeps."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgescope.errors import ConfigError
from edgescope.runtime.client.perf import (
    PERCENTILES,
    PerfError,
    PerfOptions,
    StepResult,
    Window,
    is_stable,
    run_perf,
    write_csv,
    write_json,
    write_plot,
)

from .conftest import ServerThread

MODEL = "lesion-unet"
MAX_WINDOWS = 3


def _quick(server: ServerThread, **fields: Any) -> PerfOptions:
    """A step of about a second: short warm-up and windows, loose stability."""
    settings: dict[str, Any] = {"target": server.target, "model": MODEL, "warmup_s": 0.2, "window_s": 0.5}
    settings |= {"stable_windows": 2, "max_windows": MAX_WINDOWS, "stability": 0.5}
    return PerfOptions(**(settings | fields))


def _check_step(step: StepResult, batch_size: int = 1) -> None:
    assert step.requests > 0 and step.errors == 0, step.error_messages
    ms = step.latency_ms
    ordered = [ms["min"], *(ms[f"p{p}"] for p in PERCENTILES), ms["max"]]
    assert ordered == sorted(ordered) and ms["min"] > 0
    assert step.requests_per_s == pytest.approx(step.requests / step.duration_s)
    assert step.inferences_per_s == pytest.approx(step.requests_per_s * batch_size)
    assert 1 <= step.windows <= MAX_WINDOWS


def test_stability_needs_every_window_near_the_mean() -> None:
    steady = [Window(1.0, [0.010] * 100, 0), Window(1.0, [0.011] * 98, 0), Window(1.0, [0.0105] * 101, 0)]
    assert is_stable(steady, 0.10)
    slower = [*steady[:2], Window(1.0, [0.020] * 50, 0)]
    assert not is_stable(slower, 0.10)
    assert is_stable(slower, 1.0)
    assert not is_stable([*steady[:2], Window(1.0, [], 3)], 0.10)
    assert not is_stable([], 0.10)


def test_a_kserve_concurrency_sweep_with_server_figures(server: ServerThread, tmp_path: Path) -> None:
    options = _quick(server, concurrency=(1, 2))
    results = asyncio.run(run_perf(options))
    assert [(s.mode, s.load) for s in results] == [("concurrency", 1.0), ("concurrency", 2.0)]
    for step in results:
        _check_step(step)
        # The server's own account of the step, from ModelStatistics.
        assert set(step.server_us) == {"queue", "compute_input", "compute_infer", "compute_output"}
        assert step.server_us["compute_infer"] > 0

    write_json(results, options, tmp_path / "perf.json")
    write_csv(results, tmp_path / "perf.csv")
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["options"]["concurrency"] == [1, 2] and len(report["steps"]) == 2
    with (tmp_path / "perf.csv").open(newline="") as rows:
        table = list(csv.DictReader(rows))
    assert [float(row["load"]) for row in table] == [1.0, 2.0]
    assert float(table[0]["p99_ms"]) == pytest.approx(results[0].latency_ms["p99"])
    assert float(table[1]["server_compute_infer_us"]) == pytest.approx(results[1].server_us["compute_infer"])
    if write_plot(results, options, tmp_path / "perf.png"):
        assert (tmp_path / "perf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_batched_kserve_step_counts_inferences(server: ServerThread) -> None:
    options = _quick(server, batch_size=2)
    (step,) = asyncio.run(run_perf(options))
    _check_step(step, batch_size=2)


@pytest.mark.parametrize(("concurrency", "rates"), [((2,), ()), ((1,), (15.0,))])
def test_the_stream_protocol_under_concurrency_and_a_request_rate(
    server: ServerThread, concurrency: tuple[int, ...], rates: tuple[float, ...]
) -> None:
    options = _quick(
        server, protocol="stream", concurrency=concurrency, request_rates=rates, distribution="poisson", stream_lanes=2
    )
    (step,) = asyncio.run(run_perf(options))
    _check_step(step)
    assert step.mode == ("rate" if rates else "concurrency") and not step.server_us


@pytest.mark.parametrize(("protocol", "message"), [("kserve", "ModelMetadata"), ("stream", "first request")])
def test_an_unknown_model_stops_before_the_sweep(server: ServerThread, protocol: str, message: str) -> None:
    options = _quick(server, model="no-such-model", protocol=protocol)
    with pytest.raises(PerfError, match=message) as raised:
        asyncio.run(run_perf(options))
    assert "no-such-model" in str(raised.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"protocol": "http"}, "kserve or stream"),
        ({"request_rates": (0.0,)}, "above 0"),
        ({"concurrency": (0,)}, "1 or more"),
        ({"protocol": "stream", "batch_size": 2}, "batch-size must be 1"),
        ({"shapes": {"image": [256, 256]}}, "give 3 sizes"),
    ],
)
def test_unusable_options_are_refused(server: ServerThread, fields: dict[str, object], message: str) -> None:
    options = _quick(server, **fields)
    with pytest.raises(ConfigError, match=message):
        asyncio.run(run_perf(options))


def test_the_perf_command_writes_its_report(server: ServerThread, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "edgescope.cli", "perf", "--target", server.target, "--model", MODEL,
               "--concurrency", "1", "--warmup-s", "0.2", "--window-s", "0.5", "--max-windows", "3",
               "--json", str(tmp_path / "perf.json"), "--csv", str(tmp_path / "perf.csv")]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "concurrency 1" in run.stdout and "p99 ms" in run.stdout
    (step,) = json.loads((tmp_path / "perf.json").read_text())["steps"]
    assert step["requests"] > 0 and step["errors"] == 0
