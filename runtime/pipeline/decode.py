"""Frame message -> pixel array, with every field checked.

A malformed frame raises ``FrameError`` with a reason a person can act on;
the caller answers that frame with an error and the stream goes on.

Work per frame is bounded before it is done (``FrameLimits``): an encoded
image's declared size is read from its header and checked against the pixel
budget before any pixel is decoded, its encoding must match its magic bytes,
and a frame may ask for only so many extra models. Float pixels must be
finite: NaN or infinity would pass silently through a model as "nothing found".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import FrameError
from edgescope.runtime.pipeline.image_header import ImageHeader, jpeg_header, png_header, sniff
from edgescope.runtime.pipeline.layout import MAX_CHANNELS, raw_layout
from edgescope.v1 import manifest_pb2, stream_pb2

# Larger than any imaging sensor in use (16K x 16K); stops absurd allocations.
MAX_SIDE = 16384
# 40 megapixels: an 8K UHD video frame (33 MP) or a 6000 x 6000 detector fits.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_EXTRA_MODELS = 4
# Caller-chosen names: room for any real identifier (a UUID is 36 characters), none for a payload.
MAX_NAME_CHARS = 128
# More than any scanner's regions or windows.
MAX_REGIONS = 16
MAX_VOIS = 16


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What one frame may make the server do."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_extra_models: int = DEFAULT_MAX_EXTRA_MODELS


DEFAULT_LIMITS = FrameLimits()

_RAW_DTYPES: dict[int, type[np.uint8] | type[np.uint16] | type[np.float32]] = {
    manifest_pb2.DATA_TYPE_UINT8: np.uint8,
    manifest_pb2.DATA_TYPE_UINT16: np.uint16,
    manifest_pb2.DATA_TYPE_FLOAT32: np.float32,
}

Pixels = npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.float32]
# Resolves a shared-memory reference to the bytes it names (the server's region registry).
SharedMemoryView = Callable[[stream_pb2.SharedMemoryFrame], memoryview]


def decode_frame(
    frame: stream_pb2.Frame, shared_memory: SharedMemoryView | None = None, limits: FrameLimits = DEFAULT_LIMITS
) -> Pixels:
    """Return ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, N)`` pixels of N channels for a frame."""
    kind = frame.WhichOneof("pixels")
    if kind == "raw":
        return _decode_raw(frame.raw, limits)
    if kind == "encoded":
        return _decode_encoded(frame.encoded, limits)
    if kind == "shm":
        if shared_memory is None:
            raise FrameError("shared-memory frames are not accepted here; send the pixels as raw or encoded")
        # Same checks as raw pixels; the bytes are a read-only view of the client's slot.
        return _decode_raw(frame.shm.image, limits, shared_memory(frame.shm))
    if kind == "signal":
        raise FrameError(
            "frame carries a signal window, which only a model's signal source takes (with Frame.source naming it); "
            "this frame takes pixels: raw, encoded or shm"
        )
    raise FrameError("frame carries no pixels: set raw, encoded or shm")


def check_frame_fields(frame: stream_pb2.Frame, limits: FrameLimits) -> None:
    """Every name and list a caller chose, within bounds, checked as the frame is read.

    Each extra model is a full inference: their number is capped and none may
    repeat. Names (stream id, models, regions, windows) are echoed into answers,
    logs, previews and metrics, so none may be longer than ``MAX_NAME_CHARS``.
    """
    extra = frame.extra_models
    if len(extra) > limits.max_extra_models:
        raise FrameError(f"the frame asks for {len(extra)} extra models; at most {limits.max_extra_models} are allowed")
    if len(set(extra)) != len(extra):
        raise FrameError("the frame names an extra model more than once")
    if len(frame.regions) > MAX_REGIONS:
        raise FrameError(f"the frame has {len(frame.regions)} calibrated regions; at most {MAX_REGIONS} are allowed")
    if len(frame.pixel_transform.voi) > MAX_VOIS:
        raise FrameError(f"the frame has {len(frame.pixel_transform.voi)} VOIs; at most {MAX_VOIS} are allowed")
    names = [
        ("stream_id", frame.stream_id),
        ("model", frame.model),
        ("shared-memory region", frame.shm.region),
        ("modality LUT explanation", frame.pixel_transform.modality_lut.explanation),
        *(("extra model", name) for name in extra),
        *(("region name", region.name) for region in frame.regions),
        *(("VOI explanation", voi.explanation) for voi in frame.pixel_transform.voi),
    ]
    for what, name in names:
        if len(name) > MAX_NAME_CHARS:
            raise FrameError(f"the frame's {what} is {len(name)} characters long; at most {MAX_NAME_CHARS} are allowed")


def _check_size(width: int, height: int, limits: FrameLimits) -> None:
    if width == 0 or height == 0:
        raise FrameError(f"frame size {width}x{height} is empty")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise FrameError(f"frame size {width}x{height} exceeds the {MAX_SIDE} pixel limit per side")
    if width * height > limits.max_pixels:
        raise FrameError(
            f"frame size {width}x{height} is {width * height} pixels; this server's budget is {limits.max_pixels}"
        )


def _decode_raw(raw: stream_pb2.RawImage, limits: FrameLimits, data: bytes | memoryview | None = None) -> Pixels:
    data = raw.data if data is None else data
    _check_size(raw.width, raw.height, limits)
    dtype = _RAW_DTYPES.get(raw.dtype)
    if dtype is None:
        name = manifest_pb2.DataType.Name(raw.dtype) if raw.dtype in manifest_pb2.DataType.values() else str(raw.dtype)
        raise FrameError(f"raw dtype {name} is not supported; use UINT8, UINT16 or FLOAT32")
    channels = raw.channels
    fmt = raw.format
    expected_channels = {
        stream_pb2.PIXEL_FORMAT_GRAY: 1,
        stream_pb2.PIXEL_FORMAT_RGB: 3,
        stream_pb2.PIXEL_FORMAT_BGR: 3,
    }
    if fmt == stream_pb2.PIXEL_FORMAT_CHANNELS:
        if not 1 <= channels <= MAX_CHANNELS:
            raise FrameError(f"raw format CHANNELS needs 1 to {MAX_CHANNELS} channels, the frame says {channels}")
    elif fmt not in expected_channels:
        raise FrameError("raw pixel format must be GRAY, RGB, BGR or CHANNELS")
    elif channels != expected_channels[fmt]:
        raise FrameError(
            f"raw format {stream_pb2.PixelFormat.Name(fmt)} needs {expected_channels[fmt]} channel(s), "
            f"the frame says {channels}"
        )
    expected = raw.width * raw.height * channels * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise FrameError(
            f"raw data is {len(data)} bytes; {raw.width}x{raw.height}x{channels} "
            f"{np.dtype(dtype).name} needs {expected}"
        )
    pixels = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
    pixels = pixels.astype(dtype, copy=False)
    if dtype is np.float32 and not np.isfinite(pixels).all():
        raise FrameError("float frame holds NaN or infinite pixels")
    if channels == 1:
        return pixels.reshape(raw.height, raw.width)
    image = pixels.reshape(raw.height, raw.width, channels)
    if fmt == stream_pb2.PIXEL_FORMAT_BGR:
        image = image[:, :, ::-1]
    return image


_DECLARED = {stream_pb2.ENCODING_PNG: "png", stream_pb2.ENCODING_JPEG: "jpeg"}


def encoded_header(encoded: stream_pb2.EncodedImage, limits: FrameLimits) -> ImageHeader:
    """The image's declared size, checked against the budget; its bytes must be what it is labelled."""
    declared = _DECLARED.get(encoded.encoding)
    if declared is None:
        raise FrameError("encoded image must be PNG or JPEG")
    if not encoded.data:
        raise FrameError("encoded image is empty")
    actual = sniff(encoded.data)
    if actual != declared:
        found = f"{actual.upper()} data" if actual else "data that is neither PNG nor JPEG"
        raise FrameError(
            f"encoded image could not be decoded as {declared.upper()}: it holds {found} "
            "(the declared encoding must match the bytes)"
        )
    header = png_header(encoded.data) if declared == "png" else jpeg_header(encoded.data)
    _check_size(header.width, header.height, limits)
    return header


def _decode_encoded(encoded: stream_pb2.EncodedImage, limits: FrameLimits) -> Pixels:
    header = encoded_header(encoded, limits)
    buffer = np.frombuffer(encoded.data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        name = stream_pb2.Encoding.Name(encoded.encoding).removeprefix("ENCODING_")
        raise FrameError(f"encoded image could not be decoded as {name} (corrupt or truncated)")
    if (image.shape[1], image.shape[0]) != (header.width, header.height):
        raise FrameError("encoded image decoded to another size than its header declares")
    if image.ndim == 2:
        return cast(Pixels, image)
    if image.shape[2] == 4:
        return cast(Pixels, cv2.cvtColor(image, cv2.COLOR_BGRA2RGB))
    return cast(Pixels, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def encode_raw(pixels: Pixels) -> stream_pb2.RawImage:
    """Pack a ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, N)`` array as a RawImage (see ``raw_layout``)."""
    raw = stream_pb2.RawImage()
    encode_raw_into(raw, pixels)
    return raw


def encode_raw_into(raw: stream_pb2.RawImage, pixels: Pixels) -> None:
    """``encode_raw`` straight into a message's field (``frame.raw``): protobuf copies a megabyte of
    pixels into a parent message ten times slower than it takes them as bytes."""
    raw.CopyFrom(raw_layout(pixels))
    raw.data = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
