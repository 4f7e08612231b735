"""Telemetry end to end: a real server streaming real frames, watched through /metrics, gRPC, the page and top."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgescope.bundle import Bundle
from edgescope.cli import main
from edgescope.runtime.client.stream import StreamOptions, StreamReport, stream_source
from edgescope.runtime.server.telemetry import TelemetryHub
from edgescope.runtime.sources.base import SourceFrame
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.runtime.telemetry.metrics import TelemetryConfig
from edgescope.v1 import stream_pb2, telemetry_pb2, telemetry_pb2_grpc

from . import deploy_checks
from .conftest import ServerThread

ROOT = Path(__file__).resolve().parent.parent
MODEL = "lesion-unet"
STAGES = ("queue", "decode", "preprocess", "infer", "postprocess", "encode")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server(example_bundle: Bundle) -> Iterator[ServerThread]:
    # A budget no frame can meet, so every result must carry the latency alert.
    telemetry = TelemetryConfig(interval_s=0.2, http_port=0, latency_budget_ms={"*": 0.001})
    running = ServerThread([example_bundle.path], telemetry=telemetry)
    try:
        yield running
    finally:
        running.stop()


def _http(server: ServerThread, path: str) -> bytes:
    hub = server.running.telemetry
    assert hub is not None and hub.http_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{hub.http_port}{path}", timeout=10) as response:
        body: bytes = response.read()
        return body


def _scrape(server: ServerThread) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family name with its type."""
    samples: Samples = {}
    families = {}
    for family in text_string_to_metric_families(_http(server, "/metrics").decode()):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, families


def _value(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


class BackgroundStream:
    """A paced, endless synthetic stream on its own thread until ``stop``."""

    def __init__(self, target: str, fps: float = 15.0) -> None:
        self.source = SyntheticUltrasoundSource(seed=5, fps=fps, height=240, width=320)
        options = StreamOptions(target=target, model=MODEL, realtime=True, timeout_s=120)
        self.report: StreamReport | None = None
        self._thread = threading.Thread(target=self._run, args=(options,), daemon=True)
        self._thread.start()

    def _run(self, options: StreamOptions) -> None:
        self.report = asyncio.run(stream_source(self.source, options))

    def stop(self) -> StreamReport:
        self.source.close()
        self._thread.join(timeout=60)
        assert self.report is not None, "the stream did not finish"
        return self.report


def test_metrics_count_every_frame_of_a_stream_while_it_runs(server: ServerThread) -> None:
    before, _ = _scrape(server)
    sent = 30
    answers: list[stream_pb2.Result] = []
    during: list[float] = []

    def scrape_while_streaming(_frame: SourceFrame, result: stream_pb2.Result) -> None:
        answers.append(result)
        if len(answers) % 10 == 0:
            samples, _ = _scrape(server)
            during.append(_value(samples, "edgescope_frame_duration_seconds_count", model=MODEL))

    options = StreamOptions(target=server.target, model=MODEL, realtime=False, timeout_s=60)
    report = asyncio.run(
        stream_source(SyntheticUltrasoundSource(seed=2, n_frames=sent), options, scrape_while_streaming)
    )
    after, _ = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert report.sent == sent
    # Scraped mid-stream, the count was already moving and never ran ahead of the answers.
    base = _value(before, "edgescope_frame_duration_seconds_count", model=MODEL)
    assert during == sorted(during) and 0 < during[0] - base <= sent
    assert delta("edgescope_frame_duration_seconds_count", model=MODEL) == sent
    assert delta("edgescope_inference_success_total", model=MODEL) == sent
    for stage in STAGES:
        assert delta("edgescope_stage_duration_seconds_count", model=MODEL, stage=stage) == sent, stage
        assert delta("edgescope_stage_duration_seconds_bucket", model=MODEL, stage=stage, le="+Inf") == sent
    assert delta("edgescope_alerted_results_total", model=MODEL, kind="latency_budget_exceeded") == sent
    percentiles = {
        dict(labels)["percentile"]: value
        for (name, labels), value in after.items()
        if name == "edgescope_latency_percentile_seconds" and ("stage", "infer") in labels
    }
    assert set(percentiles) == {"50", "90", "99", "99.9", "100"}
    assert 0 < percentiles["50"] <= percentiles["99"] <= percentiles["100"]
    assert _value(after, "edgescope_alert_active", kind="latency_budget_exceeded", model=MODEL) == 1.0


def test_results_carry_alerts_and_server_stamps_for_clock_estimation(server: ServerThread) -> None:
    answers: list[stream_pb2.Result] = []
    options = StreamOptions(target=server.target, model=MODEL, realtime=False, timeout_s=60)
    report = asyncio.run(
        stream_source(SyntheticUltrasoundSource(seed=4, n_frames=12), options, lambda _f, r: answers.append(r))
    )
    for result in answers:
        kinds = [a.kind for a in result.alerts]
        assert stream_pb2.Alert.KIND_LATENCY_BUDGET_EXCEEDED in kinds
        late = next(a for a in result.alerts if a.kind == stream_pb2.Alert.KIND_LATENCY_BUDGET_EXCEEDED)
        assert late.model == MODEL and late.value > late.threshold == 0.001
        # One host, one clock: capture <= server receive <= server send.
        assert result.capture_time_ns <= result.server_receive_time_ns <= result.server_send_time_ns
    clock = report.clock.as_dict()
    assert clock["samples"] == 12
    assert abs(clock["offset_ms"]) < 50.0
    stages = report.latency.summary()
    assert {"uplink", "downlink", "end_to_end", "server_total"} <= set(stages)
    assert stages["end_to_end"].p50_ms >= stages["server_total"].p50_ms


def test_telemetry_call_streams_snapshots_that_follow_the_frames(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        options = StreamOptions(target=server.target, model=MODEL, realtime=False, timeout_s=60)
        asyncio.run(stream_source(SyntheticUltrasoundSource(seed=6, n_frames=6), options))
        call = stub.Telemetry(telemetry_pb2.TelemetryRequest(interval_s=0.1), timeout=30)
        snapshots = []
        for snapshot in call:
            snapshots.append(snapshot)
            if len(snapshots) == 3:
                call.cancel()
                break
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Telemetry(telemetry_pb2.TelemetryRequest(interval_s=-1), timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    first, _, last = snapshots
    assert first.time_ns < last.time_ns
    (model,) = [m for m in last.models if m.model == MODEL]
    assert model.frames >= 6 and model.errors == 0
    stages = {s.stage: s for s in model.stages}
    assert set(STAGES) | {"server_total"} <= set(stages)
    infer = stages["infer"]
    assert 0 < infer.p50_ms <= infer.p90_ms <= infer.p99_ms <= infer.p999_ms <= infer.max_ms
    assert any(s.model == MODEL and s.frames == 6 for s in last.streams)
    assert last.device.gpu_status and last.device.host.memory_total_bytes > 0
    assert last.device.host.process_rss_bytes > 0 and last.device.sample_cost_us > 0
    if not last.device.gpus:
        assert last.device.gpu_source == "none" and "no GPU" in last.device.gpu_status
    assert any(a.kind == stream_pb2.Alert.KIND_LATENCY_BUDGET_EXCEEDED for a in last.alerts)


def test_page_json_and_preview_are_served(server: ServerThread) -> None:
    options = StreamOptions(target=server.target, model=MODEL, realtime=False, timeout_s=60, stream_id="preview-me")
    asyncio.run(stream_source(SyntheticUltrasoundSource(seed=7, n_frames=3, height=200, width=300), options))
    page = _http(server, "/").decode()
    assert "<title>edgescope telemetry</title>" in page
    snapshot = json.loads(_http(server, "/api/snapshot"))
    assert any(s["stream_id"] == "preview-me" for s in snapshot["streams"])
    jpeg = _http(server, "/api/preview.jpg?stream=preview-me")
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    # The whole frame, with the overlay's text band below it.
    assert image is not None and image.shape[1] == 300 and image.shape[0] > 200


def test_top_prints_the_same_numbers(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    options = StreamOptions(target=server.target, model=MODEL, realtime=False, timeout_s=60)
    asyncio.run(stream_source(SyntheticUltrasoundSource(seed=8, n_frames=4), options))
    assert main(["top", "--target", server.target, "--interval", "0.1", "--count", "2"]) == 0
    out = capsys.readouterr().out
    assert MODEL in out and "server_total" in out and "infer" in out
    assert "device:" in out and "ALERT" in out


def test_top_against_no_server_fails_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--target", "127.0.0.1:1", "--count", "1"]) == 2
    assert "telemetry from 127.0.0.1:1 failed: UNAVAILABLE" in capsys.readouterr().err


def _exported_names(families: dict[str, str]) -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {name + suffix for name, kind in families.items() for suffix in suffixes.get(kind, ("",))}


def test_every_metric_the_dashboard_and_alert_rules_query_is_exported(server: ServerThread) -> None:
    hub = server.running.telemetry
    assert hub is not None
    options = StreamOptions(target=server.target, model=MODEL, realtime=False, timeout_s=60)
    asyncio.run(stream_source(SyntheticUltrasoundSource(seed=9, n_frames=3), options))
    samples, families = _scrape(server)
    exprs = deploy_checks.dashboard_exprs() + deploy_checks.alert_exprs()
    queried = deploy_checks.metric_names(exprs)
    assert len(queried) >= 20
    missing = queried - _exported_names(families)
    assert not missing, f"queried by deploy/ but not in /metrics: {sorted(missing)}"
    # Every label a query selects on is one the metric has, and every exact value exists.
    labels: dict[str, set[tuple[str, str]]] = {}
    for name, label_set in samples:
        labels.setdefault(name, set()).update(label_set)
    for metric, matchers in deploy_checks.selectors(exprs):
        for label, operator, value in matchers:
            if label in deploy_checks.TARGET_LABELS:
                continue
            assert label in {k for k, _ in labels[metric]}, f"{metric} has no label {label!r}"
            if operator == "=" and "$" not in value:
                assert (label, value) in labels[metric], f"{metric} never has {label}={value!r}"
    scrape = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in scrape and "127.0.0.1:8732" in scrape


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _dump_dom(url: str, profile: Path) -> str:
    assert CHROMIUM is not None
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=90, check=True)
    return done.stdout


def _text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match is not None, f"#{element_id} not in the page"
    return match.group(1)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_dashboard_numbers_move_in_headless_chromium(server: ServerThread, tmp_path: Path) -> None:
    hub = server.running.telemetry
    assert hub is not None
    url = f"http://127.0.0.1:{hub.http_port}/"
    stream = BackgroundStream(server.target)
    try:
        deadline = time.monotonic() + 30
        while not stream.report and time.monotonic() < deadline:
            samples, _ = _scrape(server)
            if _value(samples, "edgescope_fps", model=MODEL) > 0:
                break
            time.sleep(0.2)
        first = _dump_dom(url, tmp_path / "profile-1")
        time.sleep(1.5)
        second = _dump_dom(url, tmp_path / "profile-2")
    finally:
        report = stream.stop()
    assert report.latency.errors == 0
    for dom in (first, second):
        assert int(_text_of(dom, "updates")) >= 2, "the page did not poll the snapshot"
        assert float(_text_of(dom, "fps")) > 0
        assert float(_text_of(dom, "p99")) >= float(_text_of(dom, "p50")) > 0
        assert re.search(r'id="preview"[^>]*data-loaded="[1-9]', dom), "the live preview never loaded"
        assert "<td>infer</td>" in dom
        assert _text_of(dom, "gpu-status")
    # The stream kept going between the two loads: the page's frame count moved with it.
    assert int(_text_of(second, "frames")) > int(_text_of(first, "frames"))


def test_a_taken_metrics_port_does_not_stop_the_runtime(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        hub = TelemetryHub(TelemetryConfig(interval_s=0.5, http_port=taken.getsockname()[1]))
        try:
            assert hub.http_port is None
            assert "NOT served" in caplog.text
            assert hub.metrics.snapshot().device.host.memory_total_bytes > 0
        finally:
            hub.close()
