"""A frame source replayed from memory, shared by the benchmarks.

Frames are decoded or made once before a run, so the source itself costs
nothing while the runtime is being measured.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from edgescope.runtime.sources.base import PixelArray, SourceFrame, SourceKind


class ReplaySource:
    """``count`` frames cycling through ``pixels``, timestamped at ``fps``."""

    def __init__(
        self,
        pixels: Sequence[PixelArray],
        fps: float,
        count: int,
        kind: SourceKind,
        spacing_mm: tuple[float, float] | None = None,
    ) -> None:
        self._pixels, self._count, self._spacing_mm = pixels, count, spacing_mm
        self.fps = fps
        self.kind: SourceKind = kind

    def __iter__(self) -> Iterator[SourceFrame]:
        for index in range(self._count):
            yield SourceFrame(index, self._pixels[index % len(self._pixels)], index / self.fps, self._spacing_mm)

    def close(self) -> None:
        pass

    def __enter__(self) -> ReplaySource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
