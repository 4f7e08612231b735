"""Turning any source frame into 8-bit RGB for display (overlays, previews)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgescope.errors import FrameError
from edgescope.runtime.pipeline.intensity import display_values
from edgescope.v1 import stream_pb2

__all__ = ["to_display_rgb8"]


def to_display_rgb8(
    pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
    pixel_transform: stream_pb2.PixelTransform | None = None,
) -> npt.NDArray[np.uint8]:
    """``(H, W, 3)`` uint8 RGB for a ``(H, W)``, ``(H, W, 3)`` or ``(H, W, N)`` uint8/uint16 frame.

    A DICOM frame with its ``pixel_transform`` is shown as the standard says
    (Modality LUT, the chosen window or VOI LUT, MONOCHROME1 inverted).
    Otherwise grey is repeated into the three channels, and uint16 is windowed to the
    frame's own minimum and maximum (one window for all channels, so colours
    keep their balance); a constant frame becomes black. For display only:
    the window differs from frame to frame, so values are not comparable.
    A frame of N channels other than 3 (multi-channel MR, feature maps) shows
    its first channel in grey. The result is always a new array, so drawing on
    it leaves the frame intact.
    """
    if pixels.dtype not in (np.uint8, np.uint16):
        raise FrameError(f"cannot display {pixels.dtype} pixels; expected uint8 or uint16")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] >= 1)):
        raise FrameError(f"cannot display pixels of shape {pixels.shape}; expected (H, W) or (H, W, N)")
    if pixels.ndim == 3 and pixels.shape[2] != 3:
        pixels = pixels[:, :, 0]
    if pixel_transform is not None and pixels.ndim == 2:
        rgb8 = display_values(pixels, pixel_transform)
    elif pixels.dtype == np.uint16:
        low, high = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
        if high > low:
            scaled = (pixels.astype(np.float32) - low) * (255.0 / (high - low))
            rgb8 = np.rint(scaled).astype(np.uint8)
        else:
            rgb8 = np.zeros(pixels.shape, dtype=np.uint8)
    else:
        rgb8 = pixels.astype(np.uint8, copy=False)
    if rgb8.ndim == 2:
        return np.repeat(rgb8[:, :, np.newaxis], 3, axis=2)
    return np.array(rgb8, dtype=np.uint8, order="C", copy=True)
