"""Draw a result over its frame."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

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
