"""The commands users run: `edgescope serve` in its own process, `edgescope stream` against it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.client.demo import start_server, stop_server

pydicom_data = pytest.importorskip("pydicom.data")


@pytest.fixture(scope="module")
def served(example_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, target = start_server([example_bundle.path], tmp_path_factory.mktemp("srv") / "port")
    try:
        yield target
    finally:
        stop_server(server)
    assert server.returncode == 0  # SIGTERM stops it cleanly


def test_echo_cine_at_native_rate_gets_every_frame_answered(served: str, tmp_path: Path) -> None:
    cine = pydicom_data.get_testdata_file("color3d_jpeg_baseline.dcm")
    video, summary = tmp_path / "overlay.mp4", tmp_path / "summary.json"
    command = [
        sys.executable,
        "-m",
        "edgescope.cli",
        "stream",
        "--source",
        f"dicom:{cine}",
        "--target",
        served,
        "--save",
        str(video),
        "--summary",
        str(summary),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(summary.read_text())
    assert (report["sent"], report["results"], report["dropped"], report["errors"]) == (120, 120, 0, 0)
    # Paced by the cine's 30 fps frame time, not sent flat out (a busy machine may well be slower).
    assert report["fps"] < 32.0
    for stage in ("decode", "preprocess", "infer", "postprocess", "encode", "end_to_end"):
        assert report["stages_ms"][stage]["count"] == 120
    assert "end_to_end" in run.stdout and "p99" in run.stdout
    capture = cv2.VideoCapture(str(video))
    try:
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 120
        # The whole 640x480 frame, with the text band below it.
        assert int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == 640
        assert int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) > 480
    finally:
        capture.release()
    with av.open(str(video)) as container:
        assert container.streams.video[0].codec_context.name == "h264"


def test_models_command_lists_the_served_model(served: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "models", "--target", served],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("lesion-unet\t1\tTASK_SEGMENTATION\tonnxruntime\tgate passed")


def test_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "serve", str(tmp_path / "nope"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "no manifest.json" in run.stderr


def test_a_missing_execution_provider_is_refused_not_downgraded(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    command = [sys.executable, "-m", "edgescope.cli", "serve", str(tmp_path), "--port", "0",
               "--metrics-port", "-1", "--providers", "CUDAExecutionProvider"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "CUDAExecutionProvider" in run.stderr and "CPUExecutionProvider" in run.stderr


def test_a_server_that_goes_away_mid_stream_ends_the_stream_in_one_line_with_a_summary(
    example_bundle: Bundle, tmp_path: Path
) -> None:
    server, target = start_server([example_bundle.path], tmp_path / "port")
    summary = tmp_path / "summary.json"
    command = [sys.executable, "-m", "edgescope.cli", "stream", "--source", "synthetic:ultrasound", "--target", target]
    client = subprocess.Popen(
        [*command, "--summary", str(summary)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(3.0)  # frames are flowing
        stop_server(server)
        _, stderr = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 1
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("edgescope stream: ")
    report = json.loads(summary.read_text())
    assert report["sent"] > 0 and report["error"]
