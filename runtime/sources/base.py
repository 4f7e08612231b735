"""What every frame source yields, and the interface sources share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

SourceKind = Literal["ultrasound", "endoscopy", "fluoroscopy", "microscope", "other"]

PixelArray = npt.NDArray[np.uint8] | npt.NDArray[np.uint16]


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """One frame as read from a source.

    ``pixels`` is ``(H, W)`` for monochrome or ``(H, W, 3)`` RGB, uint8 or
    uint16, C-contiguous. ``timestamp_s`` is the presentation time relative to
    the source's first frame; streaming at the native rate paces by it.
    ``spacing_mm`` is (row, column) pixel spacing when the source knows it.
    """

    index: int
    pixels: PixelArray
    timestamp_s: float
    spacing_mm: tuple[float, float] | None


class FrameSource(Protocol):
    """A finite or endless sequence of frames; a context manager."""

    @property
    def kind(self) -> SourceKind: ...

    @property
    def fps(self) -> float:
        """Native frame rate, used to pace streaming."""
        ...

    def __iter__(self) -> Iterator[SourceFrame]: ...

    def close(self) -> None: ...

    def __enter__(self) -> FrameSource: ...

    def __exit__(self, *exc: object) -> None: ...
