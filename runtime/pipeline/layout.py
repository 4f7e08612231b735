"""How an array is described in a RawImage, shared by the byte and shared-memory paths."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgescope.errors import FrameError
from edgescope.v1 import manifest_pb2, stream_pb2


def raw_layout(pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> stream_pb2.RawImage:
    """A RawImage that describes a ``(H, W)`` gray or ``(H, W, 3)`` RGB array, without its bytes."""
    if pixels.ndim == 2:
        fmt, channels = stream_pb2.PIXEL_FORMAT_GRAY, 1
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        fmt, channels = stream_pb2.PIXEL_FORMAT_RGB, 3
    else:
        raise FrameError(f"cannot send pixels of shape {pixels.shape}; need (H, W) or (H, W, 3)")
    dtype = manifest_pb2.DATA_TYPE_UINT8 if pixels.dtype == np.uint8 else manifest_pb2.DATA_TYPE_UINT16
    return stream_pb2.RawImage(
        width=pixels.shape[1], height=pixels.shape[0], channels=channels, dtype=dtype, format=fmt
    )
