"""Write overlay frames to a video file."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError


class VideoRecorder:
    """Writes RGB frames to a video file (mp4v for .mp4, MJPG for .avi)."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self._fps = fps
        self._writer: cv2.VideoWriter | None = None
        codec = {".mp4": "mp4v", ".avi": "MJPG"}.get(path.suffix.lower())
        if codec is None:
            raise ConfigError(f"cannot write {path}: use a .mp4 or .avi file name")
        self._fourcc = cv2.VideoWriter.fourcc(*codec)
        self.frames = 0

    def write(self, frame_rgb: npt.NDArray[np.uint8]) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            height, width = frame_rgb.shape[:2]
            self._writer = cv2.VideoWriter(str(self.path), self._fourcc, self._fps, (width, height))
            if not self._writer.isOpened():
                raise ConfigError(f"OpenCV cannot open {self.path} for writing")
        self._writer.write(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> VideoRecorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
