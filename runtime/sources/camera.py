"""Cameras and capture cards through OpenCV: V4L2 devices, and GStreamer pipelines.

``v4l2:/dev/videoN?width=&height=&fps=&fourcc=`` opens a Video4Linux2 device
with OpenCV's own V4L2 backend (in every OpenCV build for Linux) and asks it
for that mode; the device's answer is checked, and a mode it does not give is
refused with what it gave instead, never streamed silently at another size.
The driver keeps one buffer, so frames are not queued behind the reader.

``gst:PIPELINE`` runs a GStreamer pipeline ending in ``appsink`` (Jetson
capture: ``nvarguscamerasrc ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert
! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1``). It needs an OpenCV
built with GStreamer; the PyPI wheels are not, JetPack's system OpenCV is.

Both are ``LiveSource``s: newest frame wins, reopened with backoff when lost.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError, MissingDependencyError, SourceError
from edgescope.runtime.sources.base import SourceKind
from edgescope.runtime.sources.live import LiveSource, Reconnect

__all__ = ["V4L2Mode", "gstreamer_available", "open_gstreamer_source", "open_v4l2_source", "parse_v4l2"]

_FOURCC = re.compile(r"^[A-Za-z0-9 ]{4}$")


@dataclass(frozen=True, slots=True)
class V4L2Mode:
    """What to ask a V4L2 device for; None leaves the device's current setting."""

    device: str
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    fourcc: str | None = None


def parse_v4l2(spec: str) -> V4L2Mode:
    """``/dev/video0?width=1920&height=1080&fps=30&fourcc=MJPG`` (the part after ``v4l2:``)."""
    device, _, query = spec.partition("?")
    if not device:
        raise ConfigError(f"v4l2:{spec}: name the device, e.g. v4l2:/dev/video0")
    values: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ConfigError(f"malformed parameters in v4l2:{spec}: {exc}") from exc
    for key, value in pairs:
        if key not in ("width", "height", "fps", "fourcc"):
            raise ConfigError(f"unknown parameter {key!r} in v4l2:{spec}; known: width, height, fps, fourcc")
        if key in values:
            raise ConfigError(f"parameter {key!r} is given twice in v4l2:{spec}")
        values[key] = value
    fourcc = values.get("fourcc")
    if fourcc is not None and not _FOURCC.match(fourcc):
        raise ConfigError(f"fourcc={fourcc!r} in v4l2:{spec} must be four letters or digits, e.g. MJPG or YUYV")
    return V4L2Mode(
        device=device,
        width=_positive_int(values, "width", spec),
        height=_positive_int(values, "height", spec),
        fps=_positive_float(values, "fps", spec),
        fourcc=fourcc,
    )


class _OpenCVReader:
    """One open OpenCV capture; frames come out RGB."""

    def __init__(self, capture: cv2.VideoCapture, name: str) -> None:
        self._capture = capture
        self._name = name
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        self._fps = fps if math.isfinite(fps) and fps > 0 else None

    @property
    def fps(self) -> float | None:
        return self._fps

    @property
    def finite(self) -> bool:
        return False

    def read(self) -> npt.NDArray[np.uint8] | None:
        ok, image = self._capture.read()
        if not ok:
            raise SourceError(f"{self._name}: the device gave no frame (unplugged, or the pipeline stopped)")
        if image.ndim == 2:
            return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), dtype=np.uint8)
        return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), dtype=np.uint8)

    def close(self) -> None:
        self._capture.release()


def open_v4l2_reader(mode: V4L2Mode) -> _OpenCVReader:
    """Open the device and set its mode; refuses a mode the device does not give."""
    capture = cv2.VideoCapture(mode.device, cv2.CAP_V4L2)
    if not capture.isOpened():
        capture.release()
        raise SourceError(f"cannot open V4L2 device {mode.device} (missing, busy, or no permission)")
    if mode.fourcc is not None:
        capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*mode.fourcc))
    if mode.width is not None:
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, mode.width)
    if mode.height is not None:
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, mode.height)
    if mode.fps is not None:
        capture.set(cv2.CAP_PROP_FPS, mode.fps)
    # One driver buffer: a frame is never read from behind a queue of older ones.
    capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    problems = _mode_mismatch(capture, mode)
    if problems:
        capture.release()
        raise SourceError(f"V4L2 device {mode.device} does not give the mode asked for: {'; '.join(problems)}")
    return _OpenCVReader(capture, f"v4l2:{mode.device}")


def open_v4l2_source(
    mode: V4L2Mode, *, kind: SourceKind = "endoscopy", reconnect: Reconnect | None = None
) -> LiveSource:
    return LiveSource(
        f"v4l2:{mode.device}", lambda: open_v4l2_reader(mode), kind=kind, reconnect=reconnect, fps=mode.fps
    )


def gstreamer_available() -> bool:
    """Whether this OpenCV was built with GStreamer."""
    match = re.search(r"GStreamer:\s*(\S+)", cv2.getBuildInformation())
    return match is not None and match.group(1).upper() == "YES"


def open_gstreamer_source(
    pipeline: str, *, kind: SourceKind = "endoscopy", reconnect: Reconnect | None = None
) -> LiveSource:
    if not pipeline.strip():
        raise ConfigError("gst: needs a pipeline ending in appsink")
    if not gstreamer_available():
        raise MissingDependencyError(
            "GStreamer capture",
            f"this OpenCV {cv2.__version__} was built without GStreamer (the PyPI wheels are); "
            "use an OpenCV built with it (JetPack's system python3-opencv), or v4l2:/dev/videoN for a V4L2 device",
        )

    def open_pipeline() -> _OpenCVReader:
        capture = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"GStreamer could not start the pipeline: {pipeline}")
        return _OpenCVReader(capture, "gst")

    return LiveSource("gst", open_pipeline, kind=kind, reconnect=reconnect)


def _mode_mismatch(capture: cv2.VideoCapture, mode: V4L2Mode) -> list[str]:
    problems = []
    for what, wanted, prop in (
        ("width", mode.width, cv2.CAP_PROP_FRAME_WIDTH),
        ("height", mode.height, cv2.CAP_PROP_FRAME_HEIGHT),
    ):
        if wanted is not None and int(capture.get(prop)) != wanted:
            problems.append(f"{what} {wanted} asked, {int(capture.get(prop))} given")
    if mode.fps is not None:
        given = float(capture.get(cv2.CAP_PROP_FPS))
        # Drivers report 29.97 for 30 and the like: 1% is the same rate.
        if not math.isclose(given, mode.fps, rel_tol=0.01):
            problems.append(f"{mode.fps:g} fps asked, {given:g} given")
    if mode.fourcc is not None:
        code = int(capture.get(cv2.CAP_PROP_FOURCC))
        given_fourcc = "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4))
        if given_fourcc.upper() != mode.fourcc.upper():
            problems.append(f"fourcc {mode.fourcc} asked, {given_fourcc!r} given")
    return problems


def _positive_int(values: dict[str, str], key: str, spec: str) -> int | None:
    if key not in values:
        return None
    try:
        number = int(values[key])
    except ValueError as exc:
        raise ConfigError(f"{key}={values[key]!r} in v4l2:{spec} is not an integer") from exc
    if number <= 0:
        raise ConfigError(f"{key}={number} in v4l2:{spec} must be positive")
    return number


def _positive_float(values: dict[str, str], key: str, spec: str) -> float | None:
    if key not in values:
        return None
    try:
        number = float(values[key])
    except ValueError as exc:
        raise ConfigError(f"{key}={values[key]!r} in v4l2:{spec} is not a number") from exc
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{key}={number} in v4l2:{spec} must be a positive number")
    return number
