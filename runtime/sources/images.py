"""A folder of still images (PNG, JPEG, TIFF, DICOM) streamed as frames: ``images:GLOB?fps=``.

Files are taken in sorted order: the files a glob pattern matches, or every
supported file of a folder. PNG, JPEG and TIFF are read with OpenCV, 16-bit
ones kept at 16 bits; DICOM files (``.dcm``, or any file that starts as DICOM
Part 10 does) go through ``DicomCineSource``, so every frame of a multi-frame
file is streamed with its pixel transform and calibration. Frames are paced
at ``fps`` (default 30).
"""

from __future__ import annotations

import glob
import math
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import cv2
import numpy as np

from edgescope.errors import ConfigError, SourceError
from edgescope.runtime.sources.base import PixelArray, SourceFrame, SourceKind
from edgescope.runtime.sources.dicom import DicomCineSource

__all__ = ["IMAGE_SUFFIXES", "ImageFolderSource"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"})
DEFAULT_FPS = 30.0
_DICOM_PREAMBLE = 128


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with path.open("rb") as handle:
        handle.seek(_DICOM_PREAMBLE)
        return handle.read(4) == b"DICM"


class ImageFolderSource:
    """Still images as a frame sequence; endless when ``loop`` is true."""

    def __init__(
        self, pattern: str, *, fps: float = DEFAULT_FPS, loop: bool = False, kind: SourceKind = "other"
    ) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ConfigError(f"fps must be a positive number, got {fps}")
        folder = Path(pattern).expanduser()
        if folder.is_dir():
            candidates = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            candidates = [Path(p) for p in glob.glob(str(folder), recursive=True)]
        self._files = sorted(p for p in candidates if p.is_file())
        if not self._files:
            raise SourceError(f"no image files match {pattern!r} (PNG, JPEG, TIFF or DICOM)")
        self._pattern = pattern
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
            raise SourceError(f"image source {self._pattern!r} is closed")
        index = 0
        while not self._closed:
            for path in self._files:
                for frame in self._frames_of(path):
                    if self.closed:
                        return
                    yield SourceFrame(
                        index=index,
                        pixels=frame.pixels,
                        timestamp_s=index / self._fps,
                        spacing_mm=frame.spacing_mm,
                        regions=frame.regions,
                        pixel_transform=frame.pixel_transform,
                    )
                    index += 1
            if not self._loop:
                return

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> ImageFolderSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _frames_of(self, path: Path) -> Iterator[SourceFrame]:
        if _is_dicom(path):
            with DicomCineSource(path) as source:
                yield from source
            return
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise SourceError(f"cannot read image {path} (not a PNG, JPEG or TIFF OpenCV can decode)")
        if image.dtype not in (np.uint8, np.uint16):
            raise SourceError(f"{path}: {image.dtype} pixels are not supported; frames are 8- or 16-bit")
        if image.ndim == 3:
            # OpenCV reads BGR(A); frames are RGB like every source's.
            code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
            image = cv2.cvtColor(image, code)
        yield SourceFrame(
            index=0, pixels=cast(PixelArray, np.ascontiguousarray(image)), timestamp_s=0.0, spacing_mm=None
        )
