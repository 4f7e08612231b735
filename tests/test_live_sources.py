"""Live sources for real on 127.0.0.1: an HTTP MJPEG camera and an H.264 MPEG-TS stream over UDP,
each served by its own process (tests/stream_servers.py), killed mid-stream to test reconnection.

V4L2: this machine has no video device and its kernel has no v4l2loopback, so
the V4L2 tests are unit tests of option handling against OpenCV's capture
interface (marked in their names); GStreamer is tested for what it does where
OpenCV lacks it.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from edgescope.errors import ConfigError, MissingDependencyError, SourceError
from edgescope.runtime.sources import camera as camera_module
from edgescope.runtime.sources import open_source
from edgescope.runtime.sources.camera import V4L2Mode, gstreamer_available, open_v4l2_source, parse_v4l2
from edgescope.runtime.sources.images import ImageFolderSource
from edgescope.runtime.sources.live import LiveSource, Reconnect
from edgescope.runtime.sources.network import open_network_source, redact

SERVERS = Path(__file__).with_name("stream_servers.py")
WIDTH, HEIGHT = 160, 120


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(SERVERS), *args], stdout=subprocess.DEVNULL)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(timeout=10)


def _wait_listening(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _column(pixels: np.ndarray) -> int:
    """Where the server's moving white column is."""
    return int(pixels[:, :, 0].astype(np.int32).sum(axis=0).argmax())


@pytest.fixture
def camera() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = _free_port()
    process = _start("mjpeg", str(port))
    try:
        _wait_listening(port)
        yield port, process
    finally:
        _stop(process)


def test_http_mjpeg_camera_on_loopback(camera: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, _ = camera
    with open_source(f"http://127.0.0.1:{port}/stream") as source:
        assert isinstance(source, LiveSource)
        frames = list(itertools.islice(source, 10))
    assert [f.index for f in frames] == list(range(10))
    assert all(f.pixels.shape == (HEIGHT, WIDTH, 3) and f.pixels.dtype == np.uint8 for f in frames)
    # The column moves: these are successive live frames, not one frame repeated.
    assert len({_column(f.pixels) for f in frames}) > 5
    stamps = [f.timestamp_s for f in frames]
    assert stamps == sorted(stamps) and stamps[0] == 0.0


def test_a_slow_reader_gets_the_newest_frame_not_a_backlog(camera: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, _ = camera
    with open_network_source(f"http://127.0.0.1:{port}/stream") as source:
        frames = iter(source)
        next(frames)
        for _ in range(3):
            time.sleep(0.3)  # about nine frames arrive meanwhile
            next(frames)
        assert source.replaced >= 10


def test_reconnects_after_the_server_is_killed_mid_stream(camera: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, process = camera
    reconnect = Reconnect(backoff_s=0.1, max_backoff_s=0.5, stall_timeout_s=15.0)
    with open_network_source(f"http://127.0.0.1:{port}/stream", reconnect=reconnect) as source:
        frames = iter(source)
        assert len(list(itertools.islice(frames, 5))) == 5
        _stop(process)
        restarted = _start("mjpeg", str(port))
        try:
            _wait_listening(port)
            after = list(itertools.islice(frames, 5))
        finally:
            _stop(restarted)
        assert len(after) == 5
        assert source.reconnects >= 1


def test_a_stream_that_stays_down_ends_with_the_reason(camera: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, process = camera
    reconnect = Reconnect(backoff_s=0.1, max_backoff_s=0.2, stall_timeout_s=1.5)
    with open_network_source(f"http://127.0.0.1:{port}/stream", reconnect=reconnect) as source:
        frames = iter(source)
        next(frames)
        _stop(process)
        started = time.monotonic()
        with pytest.raises(SourceError, match=r"no frame for 1.5 s; last error: .*(refused|ended|failed)"):
            for _ in itertools.islice(frames, 1000):
                pass
        assert time.monotonic() - started < 10


def test_a_stream_that_cannot_be_opened_says_why() -> None:
    port = _free_port()
    with pytest.raises(SourceError, match="Connection refused"):
        open_source(f"http://127.0.0.1:{port}/stream")
    # RTSP goes through FFmpeg's RTSP client (over TCP) the same way.
    with pytest.raises(SourceError, match=f"rtsp://127.0.0.1:{port}/live"):
        open_source(f"rtsp://127.0.0.1:{port}/live")


def test_h264_mpegts_over_udp() -> None:
    port = _free_port(socket.SOCK_DGRAM)
    sender = _start("udp", str(port), "30")
    try:
        with open_source(f"udp://127.0.0.1:{port}") as source:
            assert source.fps == pytest.approx(30.0)
            frames = list(itertools.islice(source, 8))
    finally:
        _stop(sender)
    assert all(f.pixels.shape == (HEIGHT, WIDTH, 3) for f in frames)
    assert len({_column(f.pixels) for f in frames}) > 3


def test_srt_without_libsrt_says_what_is_missing() -> None:
    # PyAV's wheels have no libsrt: the error names what is missing. A PyAV built
    # with it would instead fail to reach the port nobody listens on.
    with pytest.raises((MissingDependencyError, SourceError), match=r"srt") as info:
        open_source(f"srt://127.0.0.1:{_free_port(socket.SOCK_DGRAM)}")
    if isinstance(info.value, MissingDependencyError):
        assert "libsrt" in str(info.value)


def test_passwords_stay_out_of_names_and_messages() -> None:
    assert redact("rtsp://admin:secret@10.0.0.5:554/stream") == "rtsp://admin:***@10.0.0.5:554/stream"
    assert redact("http://camera.local/mjpeg") == "http://camera.local/mjpeg"
    port = _free_port()
    with pytest.raises(SourceError) as info:
        open_source(f"http://user:secret@127.0.0.1:{port}/stream")
    assert "secret" not in str(info.value)


def test_v4l2_option_handling_unit_tested_without_a_device() -> None:
    assert parse_v4l2("/dev/video2?width=1920&height=1080&fps=59.94&fourcc=MJPG") == V4L2Mode(
        "/dev/video2", 1920, 1080, 59.94, "MJPG"
    )
    assert parse_v4l2("/dev/video0") == V4L2Mode("/dev/video0")
    for spec, message in [
        ("/dev/video0?size=1", "unknown parameter 'size'"),
        ("/dev/video0?width=wide", "not an integer"),
        ("/dev/video0?width=0", "must be positive"),
        ("/dev/video0?fps=-3", "positive number"),
        ("/dev/video0?fourcc=H264X", "four letters"),
        ("/dev/video0?width=1&width=2", "given twice"),
        ("?width=1", "name the device"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_v4l2(spec)


class _FakeCapture:
    """Stands in for cv2.VideoCapture on a V4L2 device that gives 1280x720 at 30 fps in YUYV whatever is asked."""

    given: ClassVar[dict[int, float]] = {
        cv2.CAP_PROP_FRAME_WIDTH: 1280.0,
        cv2.CAP_PROP_FRAME_HEIGHT: 720.0,
        cv2.CAP_PROP_FPS: 30.0,
    }

    def __init__(self, device: str, backend: int) -> None:
        self.device, self.backend = device, backend
        self.asked: list[tuple[int, float]] = []
        self.released = False
        self.frames = 0

    def isOpened(self) -> bool:
        return True

    def set(self, prop: int, value: float) -> bool:
        self.asked.append((prop, value))
        return True

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FOURCC:
            return float(cv2.VideoWriter.fourcc(*"YUYV"))
        return self.given.get(prop, 0.0)

    def read(self) -> tuple[bool, np.ndarray]:
        self.frames += 1
        image = np.zeros((720, 1280, 3), np.uint8)
        image[..., 0] = 200  # blue in OpenCV's BGR
        return True, image

    def release(self) -> None:
        self.released = True


def test_v4l2_mode_is_asked_for_and_a_mode_not_given_is_refused_unit_tested(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[_FakeCapture] = []

    def fake(device: str, backend: int) -> _FakeCapture:
        opened.append(_FakeCapture(device, backend))
        return opened[-1]

    monkeypatch.setattr(camera_module.cv2, "VideoCapture", fake)
    with open_v4l2_source(parse_v4l2("/dev/video0?width=1280&height=720&fps=30&fourcc=YUYV")) as source:
        frame = next(iter(source))
    capture = opened[0]
    assert (capture.device, capture.backend) == ("/dev/video0", cv2.CAP_V4L2)
    asked = dict(capture.asked)
    assert asked[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter.fourcc(*"YUYV")
    assert (asked[cv2.CAP_PROP_FRAME_WIDTH], asked[cv2.CAP_PROP_FRAME_HEIGHT], asked[cv2.CAP_PROP_FPS]) == (
        1280,
        720,
        30,
    )
    assert asked[cv2.CAP_PROP_BUFFERSIZE] == 1
    assert frame.pixels.shape == (720, 1280, 3) and frame.pixels[0, 0, 2] == 200  # BGR -> RGB
    assert capture.released
    with pytest.raises(SourceError, match="width 1920 asked, 1280 given; height 1080 asked, 720 given"):
        open_v4l2_source(parse_v4l2("/dev/video0?width=1920&height=1080"))
    with pytest.raises(SourceError, match="fourcc MJPG asked, 'YUYV' given"):
        open_v4l2_source(parse_v4l2("/dev/video0?fourcc=MJPG"))
    assert opened[-1].released


def test_a_missing_v4l2_device_and_the_video_alias() -> None:
    missing = "/dev/video97"
    assert not Path(missing).exists()
    for spec in (f"v4l2:{missing}", f"video:{missing}"):
        with pytest.raises(SourceError, match=f"cannot open V4L2 device {missing}"):
            open_source(spec)
    port = _free_port()
    with pytest.raises(SourceError, match="Connection refused"):
        open_source(f"video:http://127.0.0.1:{port}/stream")


def test_gstreamer_where_opencv_has_none_says_so() -> None:
    if gstreamer_available():
        pytest.skip("this OpenCV has GStreamer")
    with pytest.raises(MissingDependencyError, match="built without GStreamer"):
        open_source("gst:videotestsrc ! videoconvert ! appsink")


def _dicom(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    assert isinstance(found, str)
    return Path(found)


def test_image_folder_in_order_with_16bit_and_dicom(tmp_path: Path) -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 250  # red
    grey16 = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 97).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "b.tiff"), grey16)
    cv2.imwrite(str(tmp_path / "c.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    # A DICOM file without a suffix is still found by its preamble.
    (tmp_path / "d").write_bytes(_dicom("MR_small.dcm").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    with open_source(f"images:{tmp_path}?fps=5") as source:
        assert isinstance(source, ImageFolderSource)
        assert source.fps == 5.0
        frames = list(source)
    assert len(frames) == 3  # a folder: supported suffixes only, so "d" is left out
    assert frames[0].pixels[0, 0].tolist() == [250, 0, 0]
    np.testing.assert_array_equal(frames[1].pixels, grey16)
    assert [f.timestamp_s for f in frames] == pytest.approx([0.0, 0.2, 0.4])
    with open_source(f"images:{tmp_path}/?") as source:  # a glob's ? wildcard, not parameters
        (dicom_frame,) = list(source)
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    assert dicom_frame.pixel_transform is not None
    np.testing.assert_array_equal(
        dicom_frame.pixels.astype(np.int32), ds.pixel_array.astype(np.int32) + (1 << (ds.BitsStored - 1))
    )
    with open_source(f"images:{tmp_path}/*.png", loop=True) as source:
        assert [f.index for f in itertools.islice(source, 3)] == [0, 1, 2]
    with pytest.raises(SourceError, match="no image files match"):
        open_source(f"images:{tmp_path}/*.bmp")
    with pytest.raises(ConfigError, match="unknown parameter 'rate'"):
        open_source(f"images:{tmp_path}?rate=3")


def test_capture_spec_from_the_readme_parses_to_a_v4l2_source() -> None:
    from edgescope.runtime.server.capture import CaptureConfig

    config = CaptureConfig.parse("probe=v4l2:/dev/video0?width=1920&height=1080@lesion-unet")
    assert (config.source, config.model) == ("v4l2:/dev/video0?width=1920&height=1080", "lesion-unet")
    camera: Any = parse_v4l2(config.source.removeprefix("v4l2:"))
    assert camera.width == 1920


@pytest.fixture
def served_file(tmp_path: Path) -> Iterator[str]:
    """A 15-frame H.264 MPEG-TS file, served over HTTP on loopback: a stream with an end."""
    import av

    with av.open(str(tmp_path / "clip.ts"), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(15):
            image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            image[:, (index * 9) % WIDTH] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port)
        yield f"http://127.0.0.1:{port}/clip.ts"
    finally:
        _stop(server)


def test_a_file_served_over_http_ends_the_source_when_it_ends(served_file: str) -> None:
    started = time.monotonic()
    with open_network_source(served_file, reconnect=Reconnect(stall_timeout_s=5.0)) as source:
        frames = list(itertools.islice(source, 100))
        reconnects = source.reconnects
    # The newest frame wins, so a reader may miss some; but the source ends, and is not reopened.
    assert 1 <= len(frames) <= 15
    assert reconnects == 0
    assert time.monotonic() - started < 5.0


def test_a_looped_file_is_reopened_at_the_backoffs_pace_not_at_once(served_file: str) -> None:
    with open_network_source(served_file, loop=True, reconnect=Reconnect(backoff_s=0.5, max_backoff_s=8)) as source:
        deadline = time.monotonic() + 3.0
        frames = 0
        for _ in source:
            frames += 1
            if time.monotonic() > deadline:
                break
        reconnects = source.reconnects
    # 0.5 + 1 + 2 s of waiting fit three tries in three seconds (it was ~100 a second).
    assert 1 <= reconnects <= 3, reconnects
    assert frames > 15
