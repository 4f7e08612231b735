"""Write overlay frames to a video file people can open: H.264 MP4 or VP9 WebM, browser-playable.

Encoded with PyAV (FFmpeg's libraries; its wheels bundle libx264 and
libvpx): ``.mp4`` is H.264 (x264's ultrafast preset), yuv420p, with the index at the
front (``+faststart``) so a browser starts playing before the whole file has
arrived; ``.webm`` is VP9. 4:2:0 video needs an even width and height: an
odd-sized frame gets one black row or column added, never loses one.
``.avi`` stays Motion JPEG through OpenCV, for tools that want every frame
as a still.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError, MissingDependencyError

__all__ = ["CODECS", "VideoRecorder"]

# Suffix -> (PyAV encoder, its options); None: OpenCV's Motion JPEG writer.
CODECS: dict[str, tuple[str, dict[str, str]] | None] = {
    # ultrafast on one thread: a few ms per frame, and the other cores stay with the stream itself.
    ".mp4": ("libx264", {"preset": "ultrafast", "crf": "23", "threads": "1"}),
    ".webm": ("libvpx-vp9", {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8", "threads": "1"}),
    ".avi": None,
}


class VideoRecorder:
    """Writes RGB frames (all of one size) to ``path`` at ``fps``."""

    def __init__(self, path: Path, fps: float) -> None:
        suffix = path.suffix.lower()
        if suffix not in CODECS:
            raise ConfigError(f"cannot write {path}: use a .mp4 (H.264), .webm (VP9) or .avi (Motion JPEG) file name")
        self.path = path
        self._fps = fps
        self._codec = CODECS[suffix]
        self._container: Any = None
        self._stream: Any = None
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self.frames = 0
        if self._codec is not None:
            # Checked (and PyAV's 100 ms import paid) now, before frames are streaming, not at the first one.
            _require_encoder(self._codec[0])

    def write(self, frame_rgb: npt.NDArray[np.uint8]) -> None:
        if self._size is None:
            self._open(frame_rgb.shape[0], frame_rgb.shape[1])
        elif frame_rgb.shape[:2] != self._size:
            raise ConfigError(f"{self.path}: frames are {self._size}, this one is {frame_rgb.shape[:2]}")
        if self._writer is not None:
            self._writer.write(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))
        else:
            self._encode(_even(frame_rgb))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._container is not None:
            for packet in self._stream.encode():  # flush what the encoder holds
                self._container.mux(packet)
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoRecorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._size = (height, width)
        if self._codec is None:
            writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter.fourcc(*"MJPG"), self._fps, (width, height))
            if not writer.isOpened():
                raise ConfigError(f"OpenCV cannot open {self.path} for writing")
            self._writer = writer
            return
        import av

        encoder, options = self._codec
        rate = Fraction(self._fps).limit_denominator(1001)
        container_options = {"movflags": "+faststart"} if self.path.suffix.lower() == ".mp4" else {}
        self._container = av.open(str(self.path), "w", options=container_options)
        stream = self._container.add_stream(encoder, rate=rate)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = options
        self._stream = stream

    def _encode(self, frame_rgb: npt.NDArray[np.uint8]) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
        frame.pts = self.frames
        for packet in self._stream.encode(frame):
            self._container.mux(packet)


def _even(frame_rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The frame with a black row and/or column added to make both sides even."""
    height, width = frame_rgb.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame_rgb
    padded = np.zeros((height + height % 2, width + width % 2, 3), dtype=np.uint8)
    padded[:height, :width] = frame_rgb
    return padded


def _require_encoder(encoder: str) -> None:
    import av

    if encoder not in av.codecs_available:
        raise MissingDependencyError(f"the {encoder} encoder", "install PyAV's wheels (pip install av), which carry it")
