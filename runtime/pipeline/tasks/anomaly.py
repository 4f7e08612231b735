"""Anomaly detection: a per-pixel anomaly map -> score, decision and heat map of the frame."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from edgescope.errors import BackendError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.runtime.pipeline.tasks.common import FloatArray, TaskResult, frame_region, resize_to, task_output
from edgescope.v1 import manifest_pb2, stream_pb2


def anomaly_map(output: FloatArray, geometry: Geometry, input_height: int) -> FloatArray:
    """The ``(1, 1, H, W)`` map cut to the frame's part of the input."""
    if output.ndim != 4 or output.shape[:2] != (1, 1):
        raise BackendError(f"anomaly output has shape {output.shape}; expected (1, 1, H, W)")
    return frame_region(output[0, 0], geometry, input_height)


def anomaly_score(amap: FloatArray) -> float:
    return float(amap.mean())


def heat_map(amap: FloatArray, params: manifest_pb2.AnomalyParams) -> npt.NDArray[np.uint8]:
    if params.heatmap_normalization == manifest_pb2.HEATMAP_NORMALIZATION_PER_FRAME:
        low, high = float(amap.min()), float(amap.max())
    else:
        low, high = 0.0, params.heatmap_max or float(amap.max())
    span = high - low if high > low else 1.0
    return np.asarray(np.rint(np.clip((amap - low) / span, 0.0, 1.0) * 255.0), dtype=np.uint8)


def postprocess_anomaly(
    outputs: Outputs,
    manifest: manifest_pb2.ModelManifest,
    geometry: Geometry,
    regions: Sequence[stream_pb2.CalibratedRegion],
) -> TaskResult:
    params = manifest.postprocessing.anomaly
    amap = anomaly_map(task_output(outputs, manifest), geometry, manifest.preprocessing.height)
    score = anomaly_score(amap)
    heat = resize_to(heat_map(amap, params), geometry.frame_height, geometry.frame_width)
    quantities = [
        stream_pb2.Quantity(name="anomaly_score", value=score, unit="1"),
        stream_pb2.Quantity(name="anomalous", value=float(score > params.score_threshold), unit="1"),
    ]
    return TaskResult(images={"heatmap": heat}, quantities=quantities)
