"""Prometheus conventions: the runtime's /metrics and deploy/'s config and rules pass promtool.

promtool comes with Debian's ``prometheus`` package (``.ci/run`` installs it);
the tests that need it skip, saying so, where it is absent.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgescope.bundle import Bundle
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.runtime.telemetry.device import DeviceSample, HostSample
from edgescope.runtime.telemetry.gpu import GpuSample
from edgescope.runtime.telemetry.metrics import RuntimeMetrics, TelemetryConfig
from edgescope.v1 import stream_pb2

from . import deploy_checks
from .conftest import ServerThread

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)"
)
MODEL = "lesion-unet"
PER_MODEL_COUNTERS = (
    "edgescope_inference_success_total",
    "edgescope_inference_failure_total",
    "edgescope_deadline_misses_total",
    "edgescope_warmup_frames_total",
)


def _promtool(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def test_loading_a_model_starts_every_per_model_counter_at_zero() -> None:
    metrics = RuntimeMetrics()
    metrics.set_models(["probe-cls"])
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    model = ("model", "probe-cls")
    for name in PER_MODEL_COUNTERS:
        assert samples[(name, frozenset({model}))] == 0.0, name
    for reason in ("stale", "deadline", "shutdown"):
        assert samples[("edgescope_frames_dropped_total", frozenset({model, ("reason", reason)}))] == 0.0
    # A drop then moves the series that already existed.
    stale = stream_pb2.Result(stream_id="s1", seq=0)
    stale.status.code = stream_pb2.FRAME_STATUS_CODE_DROPPED
    stale.status.drop_reason = stream_pb2.DROP_REASON_STALE
    metrics.observe_result("probe-cls", "s1", stale)
    after = generate_latest(metrics.registry).decode()
    assert 'edgescope_frames_dropped_total{model="probe-cls",reason="stale"} 1.0' in after


@pytest.fixture(scope="module")
def server(example_bundle: Bundle) -> Iterator[ServerThread]:
    running = ServerThread([example_bundle.path], telemetry=TelemetryConfig(interval_s=0.2, http_port=0))
    try:
        yield running
    finally:
        running.stop()


@needs_promtool
def test_promtool_check_metrics_passes_on_a_live_scrape(server: ServerThread) -> None:
    hub = server.running.telemetry
    assert hub is not None and hub.http_port is not None
    options = StreamOptions(target=server.target, model=MODEL, realtime=False, timeout_s=60)
    report = asyncio.run(stream_source(SyntheticUltrasoundSource(seed=3, n_frames=6), options))
    assert report.latency.results == 6
    with urllib.request.urlopen(f"http://127.0.0.1:{hub.http_port}/metrics", timeout=10) as response:
        scrape = response.read().decode()
    # The scrape holds what promtool judges: latency percentiles, histograms, counters, device gauges.
    for name in ("edgescope_latency_percentile_seconds", "edgescope_stage_duration_seconds_bucket"):
        assert name in scrape
    done = _promtool("check", "metrics", stdin=scrape)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "compose-prometheus.yml"])
def test_promtool_accepts_the_scrape_configs(config: str) -> None:
    done = _promtool("check", "config", str(PROMETHEUS / config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


@needs_promtool
def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    checked = _promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    done = _promtool("test", "rules", "alerts_test.yml", cwd=ROOT / "tests" / "prometheus")
    assert done.returncode == 0, done.stdout + done.stderr
    # Every rule is exercised by the unit tests.
    tested = set(re.findall(r"alertname: (\w+)", (ROOT / "tests" / "prometheus" / "alerts_test.yml").read_text()))
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    assert tested == {rule["alert"] for group in groups for rule in group["rules"]}


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # Grafana's variables, replaced as Grafana would for "All" and a 1 h range.
    values = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*", "$instance": ".*", "$model": ".*"}
    rules = []
    for i, expr in enumerate(deploy_checks.dashboard_exprs()):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        if expr.startswith("label_values("):
            # Grafana's own function: its selector is the PromQL part.
            expr = expr[len("label_values(") : expr.rindex(",")]
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_check_metrics_passes_with_every_gpu_family(tmp_path: Path) -> None:
    # No GPU here: a device sample as NVML and tegrastats (Thor: no utilisation) give them, through
    # the same exporter, so the GPU families are linted too.
    nvml = GpuSample(
        index=0,
        name="NVIDIA RTX A4000",
        utilization_percent=87.0,
        memory_used_bytes=3 << 30,
        memory_total_bytes=16 << 30,
        temperature_c=71.0,
        power_w=120.5,
        timestamp_s=1.0,
        process_memory_bytes=1 << 30,
        power_limit_w=140.0,
        sm_clock_mhz=1560.0,
        memory_clock_mhz=7001.0,
        throttle_reasons=("sw_power_cap",),
        ecc_corrected=0,
        ecc_uncorrected=0,
    )
    thor = GpuSample(1, "Jetson iGPU", -1.0, 3 << 30, 122 << 30, 50.5, 6.33, 1.0, sm_clock_mhz=1574.0)
    metrics = RuntimeMetrics()
    metrics.set_models([MODEL])
    metrics.observe_device(
        DeviceSample("nvml", "ok", (nvml, thor), HostSample(12.5, 4 << 30, 16 << 30, 300 << 20), 51_000, 1)
    )
    scrape = generate_latest(metrics.registry).decode()
    assert 'edgescope_gpu_throttle{gpu="0",reason="sw_power_cap"} 1.0' in scrape
    done = _promtool("check", "metrics", stdin=scrape)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
