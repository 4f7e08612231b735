"""Pixels -> model input tensor, exactly as the bundle's manifest says.

Export and runtime share this code path so the tensor a model sees in the
field is the one the accuracy gate measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import BundleError, FrameError
from edgescope.runtime.pipeline.decode import Pixels
from edgescope.runtime.pipeline.intensity import apply_intensity
from edgescope.v1 import manifest_pb2, stream_pb2


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where the frame landed inside the model input, to map outputs back."""

    frame_height: int
    frame_width: int
    # The resized frame occupies rows [top, top+height) and columns [left, left+width).
    top: int
    left: int
    height: int
    width: int


def input_channels(spec: manifest_pb2.Preprocessing) -> int:
    """Channels of the model's input tensor: as declared, or as the colour mode implies (older bundles)."""
    if spec.channels:
        return spec.channels
    return 1 if spec.color == manifest_pb2.COLOR_MODE_GRAY else 3


def _channels_of(pixels: Pixels) -> int:
    return 1 if pixels.ndim == 2 else int(pixels.shape[2])


def _to_color(pixels: Pixels, spec: manifest_pb2.Preprocessing) -> Pixels:
    got = _channels_of(pixels)
    if spec.color == manifest_pb2.COLOR_MODE_CHANNELS:
        # Taken as sent: which channel is which is the sender's and the model's agreement.
        wanted = input_channels(spec)
        if got != wanted:
            raise FrameError(f"the model takes frames of {wanted} channel(s); this frame has {got}")
        return pixels
    if got not in (1, 3):
        raise FrameError(f"the model takes gray or RGB frames; this frame has {got} channels")
    if spec.color == manifest_pb2.COLOR_MODE_GRAY:
        if pixels.ndim == 2:
            return pixels
        return cast(Pixels, cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY))
    rgb = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB) if pixels.ndim == 2 else pixels
    if spec.color == manifest_pb2.COLOR_MODE_BGR:
        rgb = np.ascontiguousarray(rgb[:, :, ::-1])
    return cast(Pixels, rgb)


# OpenCV resizes images of at most 4 channels; more are resized in groups of 4.
_RESIZE_GROUP = 4


def _resize(image: Pixels, size: tuple[int, int], interpolation: int) -> Pixels:
    if _channels_of(image) <= _RESIZE_GROUP:
        return cast(Pixels, cv2.resize(image, size, interpolation=interpolation))
    groups = []
    for start in range(0, image.shape[2], _RESIZE_GROUP):
        group = cast(Pixels, np.ascontiguousarray(image[:, :, start : start + _RESIZE_GROUP]))
        part = cv2.resize(group, size, interpolation=interpolation)
        groups.append(part if part.ndim == 3 else part[:, :, None])
    return cast(Pixels, np.concatenate(groups, axis=2))


def preprocess(
    pixels: Pixels,
    spec: manifest_pb2.Preprocessing,
    pixel_transform: stream_pb2.PixelTransform | None = None,
) -> tuple[npt.NDArray[np.float32], Geometry]:
    """Return a batch-of-one input tensor and the geometry of the resize.

    A frame with a ``pixel_transform`` (DICOM, see ``intensity``) first
    becomes the values the manifest's ``intensity`` names: grey levels 0..255
    by default, so ``scale`` and ``mean``/``std`` read the same as for 8-bit frames.
    """
    if spec.height == 0 or spec.width == 0:
        raise BundleError("manifest preprocessing has no input height/width")
    if pixel_transform is not None:
        if pixels.dtype == np.float32:
            raise FrameError("a pixel transform applies to stored integer values, not float32 pixels")
        pixels = apply_intensity(cast(npt.NDArray[np.uint8] | npt.NDArray[np.uint16], pixels), pixel_transform, spec)
    image = _to_color(pixels, spec)
    frame_h, frame_w = pixels.shape[:2]
    if spec.resize == manifest_pb2.RESIZE_MODE_LETTERBOX:
        ratio = min(spec.width / frame_w, spec.height / frame_h)
        new_w, new_h = max(1, round(frame_w * ratio)), max(1, round(frame_h * ratio))
        top, left = (spec.height - new_h) // 2, (spec.width - new_w) // 2
    else:
        new_w, new_h, top, left = spec.width, spec.height, 0, 0
    shrinking = new_w < frame_w and new_h < frame_h
    resized = _resize(image, (new_w, new_h), cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    if (new_w, new_h) != (spec.width, spec.height):
        canvas = np.zeros((spec.height, spec.width, *resized.shape[2:]), dtype=resized.dtype)
        canvas[top : top + new_h, left : left + new_w] = resized
        resized = canvas
    geometry = Geometry(frame_h, frame_w, top, left, new_h, new_w)
    return normalised(resized, spec), geometry


def normalised(image: Pixels, spec: manifest_pb2.Preprocessing) -> npt.NDArray[np.float32]:
    """``(value * scale - mean) / std`` per channel, as one multiply-add written straight into the
    batch-of-one tensor in the model's layout (no intermediate arrays at model size).

    The manifest's scale is defined for 8-bit pixels: 16-bit frames without a pixel
    transform (16-bit PNG, TIFF) are mapped onto the same range by their full dtype
    range, here at model size, so one manifest serves both kinds of source.
    """
    planes = image if image.ndim == 3 else image[:, :, None]
    channels = planes.shape[2]
    scale = np.float32((spec.scale or 1.0) * (255.0 / 65535.0 if image.dtype == np.uint16 else 1.0))
    mean = np.asarray(spec.mean or [0.0], dtype=np.float32)
    std = np.asarray(spec.std or [1.0], dtype=np.float32)
    if mean.shape[0] not in (1, channels) or std.shape[0] not in (1, channels):
        # The bundle's fault, not the frame's (a frame of the wrong channel count is refused before this).
        raise BundleError(f"manifest mean/std have {mean.shape[0]}/{std.shape[0]} values for {channels} channels")
    gain = np.broadcast_to(scale / std, (channels,))
    offset = np.broadcast_to(-mean / std, (channels,))
    height, width = planes.shape[:2]
    nhwc = spec.layout == manifest_pb2.LAYOUT_NHWC
    tensor = np.empty((1, height, width, channels) if nhwc else (1, channels, height, width), dtype=np.float32)
    for channel in range(channels):
        target = tensor[0, :, :, channel] if nhwc else tensor[0, channel]
        np.multiply(planes[:, :, channel], gain[channel], out=target, casting="unsafe")
        if offset[channel]:
            target += offset[channel]
    return tensor
