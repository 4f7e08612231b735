"""Draw a result over its frame and write the overlay video."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError

_MASK_COLOR = np.array([40, 220, 90], dtype=np.float32)  # green fill in RGB
_ALPHA = 0.35


def draw_overlay(
    frame_rgb: npt.NDArray[np.uint8], mask: npt.NDArray[np.uint8] | None, lines: list[str]
) -> npt.NDArray[np.uint8]:
    """Return an RGB image: frame, translucent mask with outline, text lines top-left."""
    image: npt.NDArray[np.uint8] = frame_rgb.copy()
    if mask is not None and mask.shape == image.shape[:2] and mask.any():
        region = mask > 0
        image[region] = (image[region] * (1 - _ALPHA) + _MASK_COLOR * _ALPHA).astype(np.uint8)
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, (255, 230, 0), 1, cv2.LINE_AA)
    if lines:
        # A dark band keeps the text readable over burned-in scanner annotations.
        band = image[: 10 + 18 * len(lines), : min(image.shape[1], 420)]
        band[:] = (band * 0.35).astype(np.uint8)
    for row, text in enumerate(lines):
        origin = (8, 18 + 18 * row)
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return image


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
