"""How an array is described in a RawImage, shared by the byte and shared-memory paths."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgescope.errors import FrameError
from edgescope.v1 import manifest_pb2, stream_pb2

# More than any multi-channel imaging modality sends (hyperspectral endoscopy: about 100 bands).
MAX_CHANNELS = 256

_DTYPES = {
    np.dtype(np.uint8): manifest_pb2.DATA_TYPE_UINT8,
    np.dtype(np.uint16): manifest_pb2.DATA_TYPE_UINT16,
    np.dtype(np.float32): manifest_pb2.DATA_TYPE_FLOAT32,
}


def raw_layout(
    pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.float32],
) -> stream_pb2.RawImage:
    """A RawImage that describes an array, without its bytes.

    ``(H, W)`` is gray, ``(H, W, 3)`` RGB, and ``(H, W, N)`` of any other
    channel count is sent as N channels in order (``PIXEL_FORMAT_CHANNELS``).
    """
    if pixels.ndim == 2:
        fmt, channels = stream_pb2.PIXEL_FORMAT_GRAY, 1
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        fmt, channels = stream_pb2.PIXEL_FORMAT_RGB, 3
    elif pixels.ndim == 3 and 1 <= pixels.shape[2] <= MAX_CHANNELS:
        fmt, channels = stream_pb2.PIXEL_FORMAT_CHANNELS, pixels.shape[2]
    else:
        raise FrameError(f"cannot send pixels of shape {pixels.shape}; need (H, W) or (H, W, 1..{MAX_CHANNELS})")
    dtype = _DTYPES.get(pixels.dtype)
    if dtype is None:
        raise FrameError(f"cannot send {pixels.dtype} pixels; need uint8, uint16 or float32")
    return stream_pb2.RawImage(
        width=pixels.shape[1], height=pixels.shape[0], channels=channels, dtype=dtype, format=fmt
    )
