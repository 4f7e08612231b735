"""Registration / motion: a displacement field -> the same field on the frame's grid, in its units."""

from __future__ import annotations

import numpy as np

from edgescope.errors import BackendError, FrameError
from edgescope.runtime.backends.base import Outputs
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
    spacing: stream_pb2.PixelSpacing | None,
) -> TaskResult:
    field = frame_displacement(task_output(outputs, manifest), geometry, manifest.preprocessing.height)
    unit = "px"
    if manifest.postprocessing.registration.units == manifest_pb2.DISPLACEMENT_UNITS_MILLIMETERS:
        if spacing is None:
            raise FrameError("this model reports displacement in mm; the frame needs its pixel spacing")
        field *= np.array([spacing.row_mm, spacing.column_mm], dtype=np.float32)[:, None, None]
        unit = "mm"
    magnitude = np.sqrt((field**2).sum(axis=0))
    quantities = [
        stream_pb2.Quantity(name="displacement_max", value=float(magnitude.max()), unit=unit),
        stream_pb2.Quantity(name="displacement_mean", value=float(magnitude.mean()), unit=unit),
    ]
    return TaskResult(tensors={f"displacement_{unit}": field}, quantities=quantities)
