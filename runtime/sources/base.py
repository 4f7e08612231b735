"""What every frame source yields, and the interface sources share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from edgescope.v1 import stream_pb2

SourceKind = Literal["ultrasound", "endoscopy", "fluoroscopy", "microscope", "other"]

PixelArray = npt.NDArray[np.uint8] | npt.NDArray[np.uint16]


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """One frame as read from a source.

    ``pixels`` is ``(H, W)`` for monochrome, ``(H, W, 3)`` RGB, or ``(H, W, C)``
    of C channels (an array file), uint8 or uint16, C-contiguous.
    ``timestamp_s`` is the presentation time relative to
    the source's first frame; streaming at the native rate paces by it.
    ``spacing_mm`` is (row, column) pixel spacing when the source knows it
    and it holds for the whole frame. ``regions`` are the parts of the frame
    with a physical pixel size (ultrasound regions, or the whole frame), which
    quantities are measured in. ``pixel_transform`` is set for monochrome
    DICOM frames, whose ``pixels`` are then the stored values: it says how
    they become modality values and grey levels (see
    ``edgescope.runtime.pipeline.intensity``).
    """

    index: int
    pixels: PixelArray
    timestamp_s: float
    spacing_mm: tuple[float, float] | None
    regions: tuple[stream_pb2.CalibratedRegion, ...] = ()
    pixel_transform: stream_pb2.PixelTransform | None = None
    # The name of the source it came from, among several streamed together (``MergedSources``).
    source: str = ""
    # A signal source's window (``synthetic:ecg``): sent in place of the pixels, which are then empty.
    signal: stream_pb2.SignalWindow | None = None

    def describe(self, frame: stream_pb2.Frame) -> None:
        """Put what the server needs to know about these pixels (spacing, regions, transform) into ``frame``."""
        frame.source = self.source
        if self.signal is not None:
            # One oneof: the window replaces the (empty) pixels a sender may have encoded first.
            frame.signal.CopyFrom(self.signal)
        if self.spacing_mm is not None:
            frame.spacing.row_mm, frame.spacing.column_mm = self.spacing_mm
        frame.regions.extend(self.regions)
        if self.pixel_transform is not None:
            frame.pixel_transform.CopyFrom(self.pixel_transform)


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
