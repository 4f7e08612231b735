"""Small encoded previews of frames with their result, for the live page.

Telemetry keeps one JPEG of a few kilobytes per recent stream, never a frame:
``thumbnail`` shrinks the decoded pixels while the frame is being prepared,
``preview_jpeg`` draws the mask and a caption on it and encodes it.
"""

from __future__ import annotations

from typing import cast

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import FrameError
from edgescope.runtime.pipeline.decode import Pixels
from edgescope.runtime.render.overlay import draw_overlay
from edgescope.runtime.sources.display import to_display_rgb8
from edgescope.v1 import stream_pb2

THUMBNAIL_WIDTH = 320
_JPEG_QUALITY = 80


def thumbnail(
    pixels: Pixels, transform: stream_pb2.PixelTransform | None = None, width: int = THUMBNAIL_WIDTH
) -> npt.NDArray[np.uint8]:
    """8-bit RGB of the frame, at most ``width`` pixels wide (a DICOM frame shown through its ``transform``)."""
    display: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]
    if pixels.ndim == 3 and pixels.shape[2] != 3:
        # Multi-channel frames (MR channels, feature maps) show their first channel, as overlays do.
        pixels = pixels[:, :, 0]
    if pixels.dtype == np.float32:
        # Float frames have no fixed display range: stretch what is there.
        low, span = float(pixels.min()), float(pixels.max() - pixels.min()) or 1.0
        display = ((pixels - low) * (255.0 / span)).astype(np.uint8)
    else:
        display = cast("npt.NDArray[np.uint8] | npt.NDArray[np.uint16]", pixels)
    height, frame_width = display.shape[:2]
    if frame_width > width:
        size = (width, max(1, round(height * width / frame_width)))
        display = cast(
            "npt.NDArray[np.uint8] | npt.NDArray[np.uint16]", cv2.resize(display, size, interpolation=cv2.INTER_AREA)
        )
    return to_display_rgb8(display, transform if display.dtype != np.float32 else None)


def preview_jpeg(thumb: npt.NDArray[np.uint8], mask: npt.NDArray[np.uint8] | None, caption: list[str]) -> bytes:
    """JPEG of the thumbnail with the mask (any size: scaled to the thumbnail) and a caption."""
    small = None
    if mask is not None:
        height, width = thumb.shape[:2]
        small = np.asarray(cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST), dtype=np.uint8)
    rgb = draw_overlay(thumb, small, caption)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise FrameError("JPEG encoding of the preview failed")
    return bytes(jpeg.tobytes())
