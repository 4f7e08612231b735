"""Registration / motion: a displacement field -> the same field on the frame's grid, in its units."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgescope.errors import BackendError, FrameError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.calibration import assign_regions, measured
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.runtime.pipeline.tasks.common import FloatArray, TaskResult, frame_region, resize_to, task_output
from edgescope.v1 import manifest_pb2, stream_pb2


def frame_displacement(field: FloatArray, geometry: Geometry, input_height: int) -> FloatArray:
    """``(1, 2, H, W)`` in model pixels -> ``(2, frame_h, frame_w)`` in frame pixels (rows, columns)."""
    if field.ndim != 4 or field.shape[:2] != (1, 2):
        raise BackendError(f"displacement output has shape {field.shape}; expected (1, 2, H, W)")
    planes: list[FloatArray] = []
    for axis, gain in ((0, geometry.frame_height / geometry.height), (1, geometry.frame_width / geometry.width)):
        region = frame_region(field[0, axis], geometry, input_height)
        planes.append(resize_to(region, geometry.frame_height, geometry.frame_width) * np.float32(gain))
    return np.stack(planes).astype(np.float32)


def postprocess_registration(
    outputs: Outputs,
    manifest: manifest_pb2.ModelManifest,
    geometry: Geometry,
    regions: Sequence[stream_pb2.CalibratedRegion],
) -> TaskResult:
    """The field on the frame's grid, in pixels or, per calibrated region, in mm.

    In mm, each region's pixels are scaled by that region's spacing and the
    pixels outside every region are NaN (they have no physical size); the
    magnitudes are reported per region.
    """
    field = frame_displacement(task_output(outputs, manifest), geometry, manifest.preprocessing.height)
    if manifest.postprocessing.registration.units != manifest_pb2.DISPLACEMENT_UNITS_MILLIMETERS:
        magnitude = np.sqrt((field**2).sum(axis=0))
        quantities = [
            stream_pb2.Quantity(name="displacement_max", value=float(magnitude.max()), unit="px"),
            stream_pb2.Quantity(name="displacement_mean", value=float(magnitude.mean()), unit="px"),
        ]
        return TaskResult(tensors={"displacement_px": field}, quantities=quantities)
    if not regions:
        raise FrameError("this model reports displacement in mm; the frame needs its pixel spacing")
    owned, outside = assign_regions(regions, geometry.frame_height, geometry.frame_width)
    left_out = int(np.count_nonzero(outside))
    scaled = np.full_like(field, np.nan)
    quantities = []
    for part in owned:
        spacing = np.array([part.region.row_mm, part.region.column_mm], dtype=np.float32)[:, None]
        scaled[:, part.pixels] = field[:, part.pixels] * spacing
        pixels = int(np.count_nonzero(part.pixels))
        if pixels == 0:
            continue
        magnitude = np.sqrt((scaled[:, part.pixels] ** 2).sum(axis=0))
        for name, value in (("displacement_max", magnitude.max()), ("displacement_mean", magnitude.mean())):
            quantities.append(measured(name, float(value), "mm", part.region.name, pixels, left_out, outside.size))
    return TaskResult(tensors={"displacement_mm": scaled}, quantities=quantities)
