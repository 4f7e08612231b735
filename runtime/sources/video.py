"""Video files (AVI, MP4, MKV, ... whatever OpenCV's FFmpeg can read) as a frame source.

Frames are ``(H, W, 3)`` RGB uint8. Timestamps are ``index / fps``; ``fps``
is the container's frame rate, or 30 fps when the container does not give a
usable one (the usual rate of endoscopy and ultrasound video).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import SourceError
from edgescope.runtime.sources.base import SourceFrame, SourceKind

__all__ = ["DEFAULT_FPS", "VideoFileSource"]

DEFAULT_FPS = 30.0
"""Frame rate assumed when the container reports none."""


class VideoFileSource:
    """Frames of one video file, in order; endless when ``loop`` is true.

    ``index`` and ``timestamp_s`` keep increasing across loops, so pacing by
    timestamp works for looped playback too. ``kind`` defaults to endoscopy,
    the most common recorded video in the field; pass the real one when known.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        loop: bool = False,
        kind: SourceKind = "endoscopy",
    ) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise SourceError(f"video file not found: {self._path}")
        capture = self._open()
        try:
            fps = float(capture.get(cv2.CAP_PROP_FPS))
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        finally:
            capture.release()
        self._fps = fps if math.isfinite(fps) and fps > 0 else DEFAULT_FPS
        self._frame_count = count if count > 0 else None
        self._kind = kind
        self._loop = loop
        self._capture: cv2.VideoCapture | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    @property
    def kind(self) -> SourceKind:
        return self._kind

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def frame_count(self) -> int | None:
        """Frames in the file as the container declares it (an estimate for some formats)."""
        return self._frame_count

    def __iter__(self) -> Iterator[SourceFrame]:
        if self._closed:
            raise SourceError(f"video source {self._path} is closed")
        index = 0
        while not self._closed:
            # A fresh capture per pass: seeking back is unreliable for some codecs.
            capture = self._open()
            self._capture = capture
            first_of_pass = index
            try:
                while not self._closed:
                    ok, bgr = capture.read()
                    if not ok:
                        break
                    yield SourceFrame(
                        index=index,
                        pixels=self._to_rgb(bgr, index),
                        timestamp_s=index / self._fps,
                        spacing_mm=None,
                    )
                    index += 1
            finally:
                capture.release()
                self._capture = None
            if index == first_of_pass and not self._closed:
                raise SourceError(f"no frame could be read from video file {self._path}")
            if not self._loop:
                return

    def close(self) -> None:
        """Stop iteration and release the open file."""
        self._closed = True
        if self._capture is not None:
            self._capture.release()

    def __enter__(self) -> VideoFileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self._path))
        if not capture.isOpened():
            capture.release()
            raise SourceError(
                f"cannot open {self._path} as a video: not a video file, or a codec that OpenCV's FFmpeg cannot read"
            )
        return capture

    def _to_rgb(self, bgr: cv2.typing.MatLike, index: int) -> npt.NDArray[np.uint8]:
        if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise SourceError(f"{self._path}: frame {index} is {bgr.dtype} {bgr.shape}, expected 8-bit BGR")
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
