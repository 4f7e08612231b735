"""Model outputs -> task results in the frame's own pixel grid and units."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import BackendError, BundleError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.v1 import manifest_pb2, stream_pb2


@dataclass(slots=True)
class TaskResult:
    """What postprocessing produced for one frame, before encoding."""

    mask: npt.NDArray[np.uint8] | None = None
    labels: list[str] = field(default_factory=list)
    quantities: list[stream_pb2.Quantity] = field(default_factory=list)


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))).astype(np.float32)


def segmentation_mask(
    logits: npt.NDArray[np.generic], params: manifest_pb2.SegmentationParams
) -> npt.NDArray[np.uint8]:
    """Label mask (model grid) from ``(1, C, H, W)`` or ``(1, H, W)`` scores."""
    scores = np.asarray(logits, dtype=np.float32)
    if scores.ndim == 4:
        scores = scores[0]
    if scores.ndim == 2:
        scores = scores[None]
    if scores.ndim != 3:
        raise BackendError(f"segmentation output has shape {logits.shape}; expected (1, C, H, W)")
    if params.activation == manifest_pb2.ACTIVATION_SOFTMAX or scores.shape[0] > 1:
        return np.asarray(np.argmax(scores, axis=0), dtype=np.uint8)
    probs = _sigmoid(scores[0]) if params.activation == manifest_pb2.ACTIVATION_SIGMOID else scores[0]
    return (probs > (params.threshold or 0.5)).astype(np.uint8)


def remove_small_components(mask: npt.NDArray[np.uint8], min_pixels: int) -> npt.NDArray[np.uint8]:
    if min_pixels <= 0:
        return mask
    cleaned = np.zeros_like(mask)
    for label in np.unique(mask):
        if label == 0:
            continue
        _, components, stats, _ = cv2.connectedComponentsWithStats((mask == label).astype(np.uint8), connectivity=8)
        keep = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_pixels) + 1
        cleaned[np.isin(components, keep)] = label
    return cleaned


def to_frame_grid(mask: npt.NDArray[np.uint8], geometry: Geometry) -> npt.NDArray[np.uint8]:
    """Undo letterboxing and resize a model-grid mask to the frame's size."""
    inner = mask[geometry.top : geometry.top + geometry.height, geometry.left : geometry.left + geometry.width]
    resized = cv2.resize(inner, (geometry.frame_width, geometry.frame_height), interpolation=cv2.INTER_NEAREST)
    return np.asarray(resized, dtype=np.uint8)


def postprocess_segmentation(
    outputs: Outputs,
    manifest: manifest_pb2.ModelManifest,
    geometry: Geometry,
    spacing: stream_pb2.PixelSpacing | None,
) -> TaskResult:
    post = manifest.postprocessing
    name = post.output or manifest.outputs[0].name
    if name not in outputs:
        raise BundleError(f"model output {name!r} named in the manifest was not produced")
    params = post.segmentation
    mask = remove_small_components(segmentation_mask(outputs[name], params), params.min_component_pixels)
    mask = to_frame_grid(mask, geometry)
    labels = list(manifest.labels) or ["background", "lesion"]
    quantities: list[stream_pb2.Quantity] = []
    pixel_area = spacing.row_mm * spacing.column_mm if spacing is not None else 0.0
    for index, label in enumerate(labels[1:], start=1):
        region = (mask == index).astype(np.uint8)
        count, _ = cv2.connectedComponents(region, connectivity=8)
        pixels = int(region.sum())
        quantities.append(stream_pb2.Quantity(name=f"{label}_count", value=float(count - 1), unit="1"))
        quantities.append(stream_pb2.Quantity(name=f"{label}_area_pixels", value=float(pixels), unit="px"))
        if pixel_area > 0:
            quantities.append(stream_pb2.Quantity(name=f"{label}_area", value=pixels * pixel_area, unit="mm2"))
    return TaskResult(mask=mask, labels=labels, quantities=quantities)


def postprocess(
    outputs: Outputs,
    manifest: manifest_pb2.ModelManifest,
    geometry: Geometry,
    spacing: stream_pb2.PixelSpacing | None,
) -> TaskResult:
    if manifest.task == manifest_pb2.TASK_SEGMENTATION:
        return postprocess_segmentation(outputs, manifest, geometry, spacing)
    raise BundleError(f"task {manifest_pb2.Task.Name(manifest.task)} has no postprocessor in this runtime version")
