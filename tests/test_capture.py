"""Captures whose source dies: health, metrics, alerts, Subscribe, and coming back.

The capture reads a real HTTP MJPEG camera process on 127.0.0.1
(tests/stream_servers.py), which the tests kill and restart.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgescope.bundle import Bundle
from edgescope.runtime.server.capture import CaptureConfig, health_service_name
from edgescope.v1 import stream_pb2, stream_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from tests.conftest import ServerThread

SERVERS = Path(__file__).with_name("stream_servers.py")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _camera(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, str(SERVERS), "mjpeg", str(port)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    process.kill()
    raise TimeoutError("the camera did not start")


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(timeout=10)


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _health(target: str, capture: str) -> int:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=health_service_name(capture)), timeout=10
        )
    return int(response.status)


def _subscribe_until_end(target: str, capture: str, results_first: int) -> tuple[int, grpc.StatusCode, str]:
    """Subscribe, wait for ``results_first`` results, then read until the call ends; (results, code, details)."""

    async def run() -> tuple[int, grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(target) as channel:
            call = stream_pb2_grpc.StreamServiceStub(channel).Subscribe(
                stream_pb2.SubscribeRequest(capture=capture), timeout=60
            )
            received = 0
            try:
                async for _ in call:
                    received += 1
            except grpc.aio.AioRpcError as exc:
                return received, exc.code(), exc.details() or ""
            return received, await call.code(), await call.details()

    return asyncio.run(run())


@pytest.fixture
def camera_capture(example_bundle: Bundle) -> Iterator[tuple[ServerThread, int, list[subprocess.Popen[bytes]]]]:
    port = _free_port()
    cameras = [_camera(port)]
    capture = CaptureConfig(name="cam", source=f"http://127.0.0.1:{port}/stream", model="lesion-unet")
    running = ServerThread([example_bundle.path], captures=[capture])
    try:
        yield running, port, cameras
    finally:
        running.stop()
        for process in cameras:
            if process.poll() is None:
                _kill(process)


def _capture_up(running: ServerThread) -> float | None:
    assert running.running.telemetry is not None
    return running.running.telemetry.metrics.registry.get_sample_value("edgescope_capture_up", {"capture": "cam"})


def test_a_capture_whose_camera_dies_goes_not_serving_ends_subscribers_and_comes_back(
    camera_capture: tuple[ServerThread, int, list[subprocess.Popen[bytes]]],
) -> None:
    running, port, cameras = camera_capture
    target = running.target
    _wait_for(lambda: _health(target, "cam") == SERVING, "the capture to serve")
    assert _capture_up(running) == 1.0

    async def subscribe_then_kill() -> tuple[int, grpc.StatusCode, str]:
        task = asyncio.ensure_future(asyncio.to_thread(_subscribe_until_end, target, "cam", 1))
        await asyncio.sleep(1.5)
        _kill(cameras[0])
        return await task

    received, code, details = asyncio.run(subscribe_then_kill())
    assert received > 0
    assert code != grpc.StatusCode.OK
    assert "capture cam is down" in details and "no frame for" in details
    assert _health(target, "cam") == NOT_SERVING
    assert _capture_up(running) == 0.0
    metrics = running.running.telemetry.metrics if running.running.telemetry else None
    assert metrics is not None
    assert (metrics.registry.get_sample_value("edgescope_capture_failures_total", {"capture": "cam"}) or 0) >= 1
    with grpc.insecure_channel(target) as channel:
        snapshot = next(
            telemetry_pb2_grpc.TelemetryServiceStub(channel).Telemetry(telemetry_pb2.TelemetryRequest(), timeout=10)
        )
    alerts = [a for a in snapshot.alerts if a.kind == stream_pb2.Alert.KIND_CAPTURE_UNAVAILABLE]
    assert alerts and "capture cam" in alerts[0].message
    active = metrics.registry.get_sample_value("edgescope_alert_active", {"kind": "capture_unavailable", "model": ""})
    assert active == 1.0
    # While it is down, a new subscriber is told so at once.
    received, code, details = _subscribe_until_end(target, "cam", 0)
    assert received == 0 and "capture cam is down" in details

    cameras.append(_camera(port))
    _wait_for(lambda: _health(target, "cam") == SERVING, "the capture to come back", timeout_s=60)
    assert _capture_up(running) == 1.0
    assert not [a for a in metrics.active_alerts() if a.kind == stream_pb2.Alert.KIND_CAPTURE_UNAVAILABLE]


def test_a_capture_that_cannot_open_is_not_serving_with_the_reason(example_bundle: Bundle) -> None:
    port = _free_port()
    capture = CaptureConfig(name="cam", source=f"http://127.0.0.1:{port}/stream", model="lesion-unet")
    running = ServerThread([example_bundle.path], captures=[capture])
    try:
        assert running.running.telemetry is not None
        metrics = running.running.telemetry.metrics
        _wait_for(lambda: bool(metrics.active_alerts()), "the capture's alert")
        assert _health(running.target, "cam") == NOT_SERVING
        (alert,) = [a for a in metrics.active_alerts() if a.kind == stream_pb2.Alert.KIND_CAPTURE_UNAVAILABLE]
        assert "Connection refused" in alert.message
        received, code, details = _subscribe_until_end(running.target, "cam", 0)
        assert received == 0 and code != grpc.StatusCode.OK and "Connection refused" in details
    finally:
        running.stop()


def test_subscribe_to_a_capture_that_is_down_is_unavailable(example_bundle: Bundle) -> None:
    port = _free_port()
    capture = CaptureConfig(name="cam", source=f"http://127.0.0.1:{port}/stream", model="lesion-unet")
    running = ServerThread([example_bundle.path], captures=[capture])
    try:
        assert running.running.telemetry is not None
        metrics = running.running.telemetry.metrics
        _wait_for(lambda: bool(metrics.active_alerts()), "the capture's alert")
        _, code, details = _subscribe_until_end(running.target, "cam", 0)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details.startswith("capture cam is down: cannot open")
    finally:
        running.stop()
