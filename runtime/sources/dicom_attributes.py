"""What a DICOM header says about its pixels: the intensity chain and the calibrated regions.

Read once per file (and per frame where an enhanced multi-frame object gives
per-frame functional groups), turned into the wire messages a frame carries:
``PixelTransform`` (PS3.3 C.7.6.3, C.11.1, C.11.2) and ``CalibratedRegion``
(C.8.5.5 Sequence of Ultrasound Regions; Pixel Spacing, C.7.6.2.1.1; Imager
Pixel Spacing, C.8.11.4.1.1 / 10.7.1.3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from edgescope.errors import FrameError, SourceError
from edgescope.runtime.pipeline.intensity import select_voi
from edgescope.v1 import stream_pb2

__all__ = ["calibrated_regions", "frame_groups", "frame_spacing", "pixel_transform", "voi_choice"]

# Physical Units X/Y Direction (0018,6024/6026) code for centimetres.
UNITS_CM = 3

_VOI_FUNCTIONS = {
    "LINEAR": stream_pb2.VOI_FUNCTION_LINEAR,
    "LINEAR_EXACT": stream_pb2.VOI_FUNCTION_LINEAR_EXACT,
    "SIGMOID": stream_pb2.VOI_FUNCTION_SIGMOID,
}


def frame_groups(ds: Dataset, n_frames: int) -> list[Dataset] | None:
    """Per frame, the functional groups in force (per-frame items over shared ones); None when absent."""
    shared_items = ds.get("SharedFunctionalGroupsSequence") or []
    per_frame_items = ds.get("PerFrameFunctionalGroupsSequence") or []
    if not shared_items and not per_frame_items:
        return None
    groups = []
    for index in range(n_frames):
        merged = Dataset()
        for source in (shared_items[:1], per_frame_items[index : index + 1]):
            for item in source:
                for element in item:
                    merged.add(element)
        groups.append(merged)
    return groups


def pixel_transform(ds: Dataset, group: Dataset | None, path: object) -> stream_pb2.PixelTransform:
    """The monochrome intensity chain of one frame: the group's attributes where it has them, else the file's."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    transform = stream_pb2.PixelTransform(
        bits_stored=bits,
        signed=signed,
        stored_offset=1 << (bits - 1) if signed else 0,
        invert=str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1",
    )
    rescale = _first_item(group, "PixelValueTransformationSequence") or ds
    modality_luts = ds.get("ModalityLUTSequence") or []
    if modality_luts:
        item = modality_luts[0]
        transform.modality_lut.CopyFrom(_lookup_table(item, ds, path, "Modality LUT"))
        transform.modality_units = str(item.get("ModalityLUTType", "") or "")
    else:
        slope = _number(rescale.get("RescaleSlope"))
        intercept = _number(rescale.get("RescaleIntercept"))
        transform.rescale_slope = slope if slope is not None else 1.0
        transform.rescale_intercept = intercept if intercept is not None else 0.0
        transform.modality_units = str(rescale.get("RescaleType", "") or "")
    window_source = _first_item(group, "FrameVOILUTSequence") or ds
    function = str(window_source.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        raise SourceError(f"{path}: VOI LUT Function {function!r} is not one the standard defines")
    centers = _numbers(window_source.get("WindowCenter"))
    widths = _numbers(window_source.get("WindowWidth"))
    explanations = _strings(window_source.get("WindowCenterWidthExplanation"))
    for index, (center, width) in enumerate(zip(centers, widths, strict=False)):
        voi = transform.voi.add(explanation=explanations[index] if index < len(explanations) else "")
        voi.window.center, voi.window.width, voi.window.function = center, width, _VOI_FUNCTIONS[function]
    for item in ds.get("VOILUTSequence") or []:
        lut = _lookup_table(item, ds, path, "VOI LUT")
        transform.voi.add(explanation=lut.explanation, lut=lut)
    return transform


def voi_choice(transform: stream_pb2.PixelTransform, wanted: str, path: object) -> int:
    """Index of the VOI ``wanted`` names: a number is a position, anything else an explanation."""
    number = wanted.strip().isdigit()
    try:
        # The server's own choice of VOI, so a source and a manifest name windows the same way.
        voi = select_voi(transform, "" if number else wanted, int(wanted) if number else None)
    except FrameError as exc:
        raise SourceError(f"{path}: {exc}") from exc
    if voi is None:
        raise SourceError(f"{path}: no window or VOI LUT {wanted!r}; the file has none")
    return list(transform.voi).index(voi)


def calibrated_regions(ds: Dataset, group: Dataset | None) -> tuple[stream_pb2.CalibratedRegion, ...]:
    """The frame's parts with a physical pixel size.

    Ultrasound regions calibrated in cm on both axes, each with its own
    spacing (regions in other units, such as a Doppler strip in cm/s against
    seconds, measure no area and are left out). Without them, the whole
    frame: the group's or the file's Pixel Spacing, else Imager Pixel Spacing
    (at the detector, so magnified for a projection X-ray).
    """
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    regions = []
    for index, region in enumerate(ds.get("SequenceOfUltrasoundRegions") or []):
        if region.get("PhysicalUnitsXDirection") != UNITS_CM or region.get("PhysicalUnitsYDirection") != UNITS_CM:
            continue
        dx = _positive(abs(_number(region.get("PhysicalDeltaX")) or 0.0))
        dy = _positive(abs(_number(region.get("PhysicalDeltaY")) or 0.0))
        bounds = [region.get(k) for k in ("RegionLocationMinX0", "RegionLocationMinY0")]
        bounds += [region.get(k) for k in ("RegionLocationMaxX1", "RegionLocationMaxY1")]
        if dx is None or dy is None or any(b is None for b in bounds):
            continue
        x0, y0, x1, y1 = (int(b) for b in bounds)
        regions.append(
            stream_pb2.CalibratedRegion(
                name=f"ultrasound region {index}",
                x_min=min(x0, max(columns - 1, 0)),
                y_min=min(y0, max(rows - 1, 0)),
                x_max=min(x1, max(columns - 1, 0)),
                y_max=min(y1, max(rows - 1, 0)),
                row_mm=dy * 10.0,
                column_mm=dx * 10.0,
            )
        )
    if regions:
        return tuple(regions)
    measures = _first_item(group, "PixelMeasuresSequence")
    for name, holder in (("PixelSpacing", measures), ("PixelSpacing", ds), ("ImagerPixelSpacing", ds)):
        spacing = _spacing_pair(holder.get(name)) if holder is not None else None
        if spacing is not None and rows > 0 and columns > 0:
            return (
                stream_pb2.CalibratedRegion(
                    name=name,
                    x_min=0,
                    y_min=0,
                    x_max=columns - 1,
                    y_max=rows - 1,
                    row_mm=spacing[0],
                    column_mm=spacing[1],
                ),
            )
    return ()


def frame_spacing(regions: Sequence[stream_pb2.CalibratedRegion]) -> tuple[float, float] | None:
    """One (row, column) spacing for the whole frame, when every calibrated region agrees on it."""
    if not regions:
        return None
    first = (regions[0].row_mm, regions[0].column_mm)
    agree = all(
        math.isclose(r.row_mm, first[0], rel_tol=1e-6) and math.isclose(r.column_mm, first[1], rel_tol=1e-6)
        for r in regions
    )
    return first if agree else None


def _first_item(group: Dataset | None, keyword: str) -> Dataset | None:
    items = group.get(keyword) if group is not None else None
    return items[0] if items else None


def _lookup_table(item: Dataset, ds: Dataset, path: object, what: str) -> stream_pb2.LookupTable:
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
    except (AttributeError, TypeError, ValueError) as exc:
        raise SourceError(f"{path}: the {what} has no usable LUT Descriptor") from exc
    raw = item.get("LUTData")
    if raw is None:
        raise SourceError(f"{path}: the {what} has no LUT Data")
    if isinstance(raw, bytes):
        dtype = np.dtype("<u2" if ds.is_little_endian else ">u2") if bits > 8 else np.dtype(np.uint8)
        data = np.frombuffer(raw, dtype=dtype).astype(np.int64).tolist()
    else:
        data = [int(v) for v in (raw if isinstance(raw, (list, MultiValue)) else [raw])]
    expected = entries or 65536  # 0 entries means 2^16 (C.11.1.1.1)
    if len(data) < expected:
        raise SourceError(f"{path}: the {what} declares {expected} entries but holds {len(data)}")
    # A first-mapped value read as unsigned that the pixel data says is signed.
    if int(ds.get("PixelRepresentation", 0)) == 1 and first >= 1 << 15:
        first -= 1 << 16
    explanation = str(item.get("LUTExplanation", "") or "")
    return stream_pb2.LookupTable(first_mapped=first, bits=bits, data=data[:expected], explanation=explanation)


def _number(value: Any) -> float | None:
    if isinstance(value, (list, MultiValue)):
        value = value[0] if value else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _numbers(value: Any) -> list[float]:
    if value is None:
        return []
    values = value if isinstance(value, (list, MultiValue)) else [value]
    numbers = [_number(v) for v in values]
    return [n for n in numbers if n is not None]


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in (value if isinstance(value, (list, MultiValue)) else [value])]


def _positive(value: float | None) -> float | None:
    return value if value is not None and value > 0 else None


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    """A (row, column) pair of positive spacings, or None when absent or malformed."""
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if all(math.isfinite(v) and v > 0 for v in (row, col)):
        return row, col
    return None
