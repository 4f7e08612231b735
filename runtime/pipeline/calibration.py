"""Where a frame has a physical pixel size, and measuring masks only there.

A frame carries its calibrated regions (``Frame.regions``: ultrasound regions
each with its own spacing, or the whole frame for Pixel Spacing / Imager
Pixel Spacing); a frame with only ``Frame.spacing`` is one region, the whole
frame. Pixels outside every region (a scanner's header band, its grey-scale
bar, a Doppler strip in cm/s) have no physical size: a mask's area and
lengths are measured inside the regions, and what fell outside is counted
and reported, not converted. Each pixel belongs to the first region, in the
frame's order, that contains it, so overlapping regions never count it twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.v1 import stream_pb2

__all__ = ["FRAME_SPACING", "RegionPixels", "assign_regions", "calibrated_regions", "max_diameter", "measured"]

FRAME_SPACING = "frame spacing"
"""The name of the whole-frame region made from ``Frame.spacing`` alone."""


def calibrated_regions(
    regions: Sequence[stream_pb2.CalibratedRegion],
    spacing: stream_pb2.PixelSpacing | None,
    height: int,
    width: int,
) -> list[stream_pb2.CalibratedRegion]:
    """The frame's regions with a usable spacing, clipped to the frame; from ``spacing`` when it has none."""
    usable = []
    for region in regions:
        if not (_positive(region.row_mm) and _positive(region.column_mm)):
            continue
        clipped = stream_pb2.CalibratedRegion()
        clipped.CopyFrom(region)
        clipped.x_max, clipped.y_max = min(region.x_max, width - 1), min(region.y_max, height - 1)
        if clipped.x_min <= clipped.x_max and clipped.y_min <= clipped.y_max:
            usable.append(clipped)
    if usable or regions:
        return usable
    if spacing is not None and _positive(spacing.row_mm) and _positive(spacing.column_mm):
        whole = stream_pb2.CalibratedRegion(name=FRAME_SPACING, x_max=width - 1, y_max=height - 1)
        whole.row_mm, whole.column_mm = spacing.row_mm, spacing.column_mm
        return [whole]
    return []


@dataclass(frozen=True, slots=True)
class RegionPixels:
    """A region and the frame pixels that belong to it (``(H, W)`` bool)."""

    region: stream_pb2.CalibratedRegion
    pixels: npt.NDArray[np.bool_]


def assign_regions(
    regions: Sequence[stream_pb2.CalibratedRegion], height: int, width: int
) -> tuple[list[RegionPixels], npt.NDArray[np.bool_]]:
    """Each region's own pixels (first region wins where they overlap), and the pixels of none."""
    free = np.ones((height, width), dtype=np.bool_)
    owned = []
    for region in regions:
        pixels = np.zeros((height, width), dtype=np.bool_)
        rows = slice(region.y_min, region.y_max + 1)
        columns = slice(region.x_min, region.x_max + 1)
        pixels[rows, columns] = free[rows, columns]
        free[rows, columns] = False
        owned.append(RegionPixels(region, pixels))
    return owned, free


def max_diameter(mask: npt.NDArray[np.bool_], row_mm: float = 1.0, column_mm: float = 1.0) -> float:
    """The longest straight distance across any one connected part of ``mask``, in the spacing's units.

    Measured between pixel centres on each part's convex hull, with the
    row and column spacing applied (pixels need not be square). A part's hull
    is its outer boundary's hull; a part inside another's hole is shorter
    than the part around it, so outer boundaries are all it takes.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return 0.0
    scale = np.array([column_mm, row_mm])
    # A noisy mask has hundreds of specks: a part's bounding-box diagonal bounds its diameter,
    # so parts are measured largest bound first and the rest skipped once none can be longer.
    points = np.concatenate(contours).reshape(-1, 2)
    starts = np.cumsum([0] + [len(contour) for contour in contours[:-1]])
    extents = (np.maximum.reduceat(points, starts) - np.minimum.reduceat(points, starts)) * scale
    bounds = np.sqrt((extents**2).sum(axis=-1))
    longest = 0.0
    for index in np.argsort(-bounds):
        if bounds[index] <= longest:
            break
        hull = cv2.convexHull(contours[index]).reshape(-1, 2).astype(np.float64) * scale
        differences = hull[:, None, :] - hull[None, :, :]
        longest = max(longest, float(np.sqrt((differences**2).sum(axis=-1)).max()))
    return longest


def measured(
    name: str, value: float, unit: str, region: str, pixels: int, pixels_outside: int, total: int
) -> stream_pb2.Quantity:
    """A quantity measured over ``pixels`` in ``region``, with ``pixels_outside`` of ``total`` left unmeasured."""
    return stream_pb2.Quantity(
        name=name,
        value=value,
        unit=unit,
        region=region,
        pixels=pixels,
        pixels_outside=pixels_outside,
        fraction_outside=pixels_outside / total if total else 0.0,
    )


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0
