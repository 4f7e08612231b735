"""Frames from a numpy array file: ``npy:PATH.npy?fps=``.

For inputs no image format carries: co-registered MR or ultrasound channels,
feature maps, more channels than PNG or TIFF readers take. The file holds
``(T, H, W)`` gray frames or ``(T, H, W, C)`` frames of C channels (channels
last), uint8 or uint16, read with ``allow_pickle=False`` and memory-mapped,
so a long cine is not loaded at once. Frames are paced at ``fps`` (default 30).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np

from edgescope.errors import ConfigError, SourceError
from edgescope.runtime.pipeline.layout import MAX_CHANNELS
from edgescope.runtime.sources.base import PixelArray, SourceFrame, SourceKind

__all__ = ["ArrayFileSource"]

DEFAULT_FPS = 30.0


class ArrayFileSource:
    """The frames of one ``.npy`` file in order; endless when ``loop`` is true."""

    def __init__(self, path: Path, *, fps: float = DEFAULT_FPS, loop: bool = False, kind: SourceKind = "other") -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ConfigError(f"fps must be a positive number, got {fps}")
        try:
            frames = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read {path} as a numpy array file (.npy): {exc}") from exc
        if not isinstance(frames, np.ndarray):
            raise SourceError(f"{path} holds several arrays (.npz); give one .npy of frames")
        if frames.dtype not in (np.uint8, np.uint16):
            raise SourceError(f"{path}: {frames.dtype} frames are not supported; frames are 8- or 16-bit")
        if frames.ndim not in (3, 4) or 0 in frames.shape:
            raise SourceError(f"{path} holds an array of shape {frames.shape}; frames are (T, H, W) or (T, H, W, C)")
        if frames.ndim == 4 and frames.shape[3] > MAX_CHANNELS:
            raise SourceError(f"{path}: frames of {frames.shape[3]} channels; at most {MAX_CHANNELS} are sent")
        self._frames = frames
        self._path = path
        self._fps = float(fps)
        self._loop = loop
        self._kind = kind
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def kind(self) -> SourceKind:
        return self._kind

    @property
    def fps(self) -> float:
        return self._fps

    def __iter__(self) -> Iterator[SourceFrame]:
        if self._closed:
            raise SourceError(f"array source {self._path} is closed")
        index = 0
        while not self._closed:
            for frame in self._frames:
                if self.closed:
                    return
                # One channel is a gray frame, as every other source gives it.
                pixels = frame[:, :, 0] if frame.ndim == 3 and frame.shape[2] == 1 else frame
                yield SourceFrame(
                    index=index,
                    pixels=cast(PixelArray, np.array(pixels, order="C")),
                    timestamp_s=index / self._fps,
                    spacing_mm=None,
                )
                index += 1
            if not self._loop:
                return

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> ArrayFileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
