"""Stored DICOM pixel values -> the values a model or a display takes (PS3.3 C.11).

A DICOM frame travels as its stored values with a ``PixelTransform`` beside
it. The chain the standard defines is applied here, once, for the model
(``preprocess``, as the manifest's ``intensity`` says) and for the display
(the overlay, always presentation):

* stored values: signed data travels shifted by ``stored_offset``; the shift
  is undone first;
* Modality LUT (C.11.1): the Modality LUT Sequence's table when present,
  else ``value * RescaleSlope + RescaleIntercept``;
* VOI LUT (C.11.2): a window (LINEAR, LINEAR_EXACT or SIGMOID, C.11.2.1.2-3)
  or a VOI LUT table, onto grey levels 0..255; without any, the range of
  every value the stored bits can hold is mapped linearly onto 0..255;
* presentation: MONOCHROME1 is inverted (C.7.6.3.1.2).

Every possible stored value is run through the chain once and kept as a
table (256 or 65,536 entries), so a frame costs one lookup.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from edgescope.errors import FrameError
from edgescope.v1 import manifest_pb2, stream_pb2

__all__ = ["GREY_MAX", "apply_intensity", "display_values", "select_voi"]

GREY_MAX = 255.0
"""VOI output range: grey levels 0..255, the range of an 8-bit frame, so one manifest scale serves both."""

FloatArray = npt.NDArray[np.float32]
_Float64 = npt.NDArray[np.float64]

_PRESENTATION = (manifest_pb2.INTENSITY_TRANSFORM_UNSPECIFIED, manifest_pb2.INTENSITY_TRANSFORM_PRESENTATION)


def select_voi(
    transform: stream_pb2.PixelTransform, explanation: str = "", index: int | None = None
) -> stream_pb2.Voi | None:
    """The VOI named by ``explanation`` (case-insensitive), else at ``index``, else the source's choice.

    None when the frame has no VOI at all. Raises FrameError when the one asked
    for is not there, naming the ones that are.
    """
    choices = list(transform.voi)
    if explanation:
        wanted = explanation.strip().casefold()
        for voi in choices:
            if voi.explanation.strip().casefold() == wanted:
                return voi
        raise FrameError(f"no VOI {explanation!r} in this frame; it has: {_describe(choices)}")
    if index is not None:
        if not 0 <= index < len(choices):
            raise FrameError(f"VOI index {index} is out of range; this frame has: {_describe(choices)}")
        return choices[index]
    if not choices:
        return None
    if transform.selected_voi >= len(choices):
        raise FrameError(f"selected VOI {transform.selected_voi} is out of range; this frame has {len(choices)}")
    return choices[transform.selected_voi]


def apply_intensity(
    pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
    transform: stream_pb2.PixelTransform,
    spec: manifest_pb2.Preprocessing,
) -> FloatArray:
    """The values the manifest's ``intensity`` asks for, as float32 in the frame's shape."""
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise FrameError(
            f"a pixel transform applies to one-channel 8- or 16-bit frames, not {pixels.dtype} {pixels.shape}"
        )
    intensity = spec.intensity
    if intensity in _PRESENTATION:
        voi = select_voi(transform, spec.voi_explanation, spec.voi_index if spec.HasField("voi_index") else None)
    elif intensity in (manifest_pb2.INTENSITY_TRANSFORM_MODALITY, manifest_pb2.INTENSITY_TRANSFORM_STORED):
        voi = None
    else:
        raise FrameError(f"intensity transform {intensity} is not known to this runtime version")
    table = _table(
        transform.SerializeToString(deterministic=True), int(intensity), _voi_key(voi), pixels.dtype.itemsize
    )
    return np.take(table, pixels)


def display_values(
    pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16], transform: stream_pb2.PixelTransform
) -> npt.NDArray[np.uint8]:
    """Grey levels as the frame is meant to be seen: modality, the source's VOI, MONOCHROME1 inverted."""
    values = apply_intensity(pixels, transform, manifest_pb2.Preprocessing())
    return np.rint(values).astype(np.uint8)


def _describe(choices: list[stream_pb2.Voi]) -> str:
    if not choices:
        return "no window or VOI LUT"
    return ", ".join(f"{i}: {v.explanation or '(no explanation)'}" for i, v in enumerate(choices))


def _voi_key(voi: stream_pb2.Voi | None) -> bytes:
    return b"" if voi is None else voi.SerializeToString(deterministic=True)


# Keyed by serialized messages: frames of one series share a transform, so the table is built once.
@functools.lru_cache(maxsize=32)
def _table(transform_bytes: bytes, intensity: int, voi_bytes: bytes, itemsize: int) -> FloatArray:
    transform = stream_pb2.PixelTransform.FromString(transform_bytes)
    carried = np.arange(1 << (8 * itemsize), dtype=np.float64)
    stored = carried - transform.stored_offset
    if intensity == manifest_pb2.INTENSITY_TRANSFORM_STORED:
        return stored.astype(np.float32)
    modality = _modality(stored, transform)
    if intensity == manifest_pb2.INTENSITY_TRANSFORM_MODALITY:
        return modality.astype(np.float32)
    if voi_bytes:
        grey = _voi(modality, stream_pb2.Voi.FromString(voi_bytes))
    else:
        grey = _full_range(modality, stored, transform)
    if transform.invert:
        grey = GREY_MAX - grey
    return grey.astype(np.float32)


def _modality(stored: _Float64, transform: stream_pb2.PixelTransform) -> _Float64:
    if transform.HasField("modality_lut"):
        return _lookup(stored, transform.modality_lut)
    slope = transform.rescale_slope or 1.0
    return stored * slope + transform.rescale_intercept


def _lookup(values: _Float64, lut: stream_pb2.LookupTable) -> _Float64:
    """C.11.1.1.1 / C.11.2.1.1: values below the first mapped take the first entry, above the last the last."""
    if not lut.data:
        raise FrameError("a lookup table in the frame's pixel transform is empty")
    data = np.asarray(lut.data, dtype=np.float64)
    index = np.clip(np.rint(values) - lut.first_mapped, 0, len(data) - 1).astype(np.int64)
    return np.asarray(data[index], dtype=np.float64)


def _voi(values: _Float64, voi: stream_pb2.Voi) -> _Float64:
    kind = voi.WhichOneof("kind")
    if kind == "lut":
        top = float((1 << voi.lut.bits) - 1) if voi.lut.bits else float(max(voi.lut.data, default=1) or 1)
        return _lookup(values, voi.lut) * (GREY_MAX / top)
    if kind != "window":
        raise FrameError("a VOI in the frame's pixel transform has neither a window nor a LUT")
    center, width, function = voi.window.center, voi.window.width, voi.window.function
    if function == stream_pb2.VOI_FUNCTION_SIGMOID:
        if width <= 0:
            raise FrameError(f"a SIGMOID window needs a width above 0, not {width}")
        return GREY_MAX / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == stream_pb2.VOI_FUNCTION_LINEAR_EXACT:
        if width <= 0:
            raise FrameError(f"a LINEAR_EXACT window needs a width above 0, not {width}")
        low, high = center - width / 2.0, center + width / 2.0
        ramp = ((values - center) / width + 0.5) * GREY_MAX
    else:
        if width < 1:
            raise FrameError(f"a LINEAR window needs a width of at least 1, not {width}")
        low, high = center - 0.5 - (width - 1) / 2.0, center - 0.5 + (width - 1) / 2.0
        ramp = ((values - (center - 0.5)) / max(width - 1, 1e-12) + 0.5) * GREY_MAX
    grey = np.where(values <= low, 0.0, np.where(values > high, GREY_MAX, ramp))
    return np.asarray(grey, dtype=np.float64)


def _full_range(modality: _Float64, stored: _Float64, transform: stream_pb2.PixelTransform) -> _Float64:
    """No VOI: every value the stored bits can hold, after the Modality LUT, spread over 0..255."""
    bits = transform.bits_stored or 16
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if transform.signed else (0, (1 << bits) - 1)
    possible = modality[(stored >= low) & (stored <= high)]
    if possible.size == 0:
        return np.zeros_like(modality)
    lowest, highest = float(possible.min()), float(possible.max())
    if highest <= lowest:
        return np.zeros_like(modality)
    return np.clip((modality - lowest) / (highest - lowest), 0.0, 1.0) * GREY_MAX
