"""Model outputs -> task results in the frame's own pixel grid and units."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import BackendError, BundleError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.calibration import (
    RegionPixels,
    assign_regions,
    calibrated_regions,
    max_diameter,
    measured,
)
from edgescope.runtime.pipeline.confidence import segmentation_confidence
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.runtime.pipeline.tasks.anomaly import postprocess_anomaly
from edgescope.runtime.pipeline.tasks.classification import postprocess_classification
from edgescope.runtime.pipeline.tasks.common import TaskResult, sigmoid, softmax
from edgescope.runtime.pipeline.tasks.detection import postprocess_detection
from edgescope.runtime.pipeline.tasks.image import postprocess_image
from edgescope.runtime.pipeline.tasks.registration import postprocess_registration
from edgescope.v1 import manifest_pb2, stream_pb2

__all__ = ["TaskResult", "postprocess", "segmentation_mask", "segmentation_probabilities"]

Postprocessor = Callable[
    [Outputs, manifest_pb2.ModelManifest, Geometry, Sequence[stream_pb2.CalibratedRegion]],
    TaskResult,
]


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
    threshold = params.threshold or 0.5
    if params.activation != manifest_pb2.ACTIVATION_SIGMOID:
        above = scores[0] > threshold
    elif 0.0 < threshold < 1.0:
        # sigmoid(x) > t  <=>  x > logit(t): the same mask without an exp per pixel.
        above = scores[0] > np.float32(np.log(threshold / (1.0 - threshold)))
    else:
        above = sigmoid(scores[0]) > threshold
    return np.asarray(above, dtype=np.uint8)


def segmentation_probabilities(
    logits: npt.NDArray[np.generic], params: manifest_pb2.SegmentationParams, geometry: Geometry
) -> npt.NDArray[np.uint8]:
    """Each label after the background's probability at the frame's size, 8-bit (v/255): ``(C - 1, H, W)``
    from ``(1, C, H, W)`` scores (softmax), or ``(1, H, W)`` from one channel (sigmoid, or as they are),
    read as ``segmentation_mask`` and ``segmentation_confidence`` read them."""
    scores = np.asarray(logits, dtype=np.float32)
    scores = scores[0] if scores.ndim == 4 else scores
    scores = scores[None] if scores.ndim == 2 else scores
    if scores.ndim != 3:
        raise BackendError(f"segmentation output has shape {logits.shape}; expected (1, C, H, W)")
    if params.activation == manifest_pb2.ACTIVATION_SOFTMAX or scores.shape[0] > 1:
        foreground = softmax(scores, axis=0)[1:]
    elif params.activation == manifest_pb2.ACTIVATION_SIGMOID:
        foreground = sigmoid(scores)
    else:
        foreground = np.clip(scores, 0.0, 1.0)
    inner = foreground[:, geometry.top : geometry.top + geometry.height, geometry.left : geometry.left + geometry.width]
    size = (geometry.frame_width, geometry.frame_height)
    # Resized as float, rounded once: v/255 is the probability to within half a step.
    planes = [cv2.resize(np.ascontiguousarray(plane), size, interpolation=cv2.INTER_LINEAR) for plane in inner]
    return np.asarray(np.rint(np.stack(planes) * 255.0), dtype=np.uint8)


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
    regions: Sequence[stream_pb2.CalibratedRegion],
) -> TaskResult:
    post = manifest.postprocessing
    name = post.output or manifest.outputs[0].name
    if name not in outputs:
        raise BundleError(f"model output {name!r} named in the manifest was not produced")
    params = post.segmentation
    confidence = segmentation_confidence(outputs[name], params)
    mask = remove_small_components(segmentation_mask(outputs[name], params), params.min_component_pixels)
    mask = to_frame_grid(mask, geometry)
    labels = list(manifest.labels) or ["background", "lesion"]
    # Per-region pixel masks cost a full-frame pass each: made only when the frame has regions.
    assigned = assign_regions(regions, geometry.frame_height, geometry.frame_width) if regions else None
    quantities: list[stream_pb2.Quantity] = []
    for index, label in enumerate(labels[1:], start=1):
        label_mask = mask == index
        count, _ = cv2.connectedComponents(label_mask.astype(np.uint8), connectivity=8)
        total = int(np.count_nonzero(label_mask))
        made = [
            stream_pb2.Quantity(name=f"{label}_count", value=float(count - 1), unit="1"),
            stream_pb2.Quantity(name=f"{label}_area_pixels", value=float(total), unit="px"),
            *_measured(label, label_mask, total, assigned),
        ]
        # A label not found: how sure the model is that nothing is there (the frame's confidence).
        for quantity in made:
            quantity.confidence = confidence.labels.get(index, confidence.frame)
        quantities.extend(made)
    return TaskResult(mask=mask, labels=labels, quantities=quantities, confidence=confidence.frame)


def _measured(
    label: str,
    label_mask: npt.NDArray[np.bool_],
    total: int,
    assigned: tuple[list[RegionPixels], npt.NDArray[np.bool_]] | None,
) -> list[stream_pb2.Quantity]:
    """Area and largest diameter in each calibrated region the mask reaches (``assigned``: the regions'
    pixels and those of none, see ``assign_regions``); in pixels when there is none."""
    if assigned is None:
        return [
            stream_pb2.Quantity(name=f"{label}_area", value=float(total), unit="px", pixels=total),
            stream_pb2.Quantity(name=f"{label}_max_diameter", value=max_diameter(label_mask), unit="px", pixels=total),
        ]
    owned, outside = assigned
    left_out = int(np.count_nonzero(label_mask & outside))
    quantities = []
    for part in owned:
        inside = label_mask & part.pixels
        pixels = int(np.count_nonzero(inside))
        if pixels == 0:
            continue
        region = part.region
        area = pixels * region.row_mm * region.column_mm
        diameter = max_diameter(inside, region.row_mm, region.column_mm)
        quantities.append(measured(f"{label}_area", area, "mm2", region.name, pixels, left_out, total))
        quantities.append(measured(f"{label}_max_diameter", diameter, "mm", region.name, pixels, left_out, total))
    if not quantities and total:
        # All of the mask lies where the frame has no physical size: say so, in pixels.
        quantities.append(measured(f"{label}_area", float(total), "px", "", total, left_out, total))
    elif not total:
        # Nothing found: zero in the frame's physical units, so every result has the label's area.
        quantities.append(measured(f"{label}_area", 0.0, "mm2", "", 0, 0, 0))
        quantities.append(measured(f"{label}_max_diameter", 0.0, "mm", "", 0, 0, 0))
    return quantities


def postprocess(
    outputs: Outputs,
    manifest: manifest_pb2.ModelManifest,
    geometry: Geometry,
    spacing: stream_pb2.PixelSpacing | None,
    regions: Sequence[stream_pb2.CalibratedRegion] = (),
    want_probabilities: bool = False,
) -> TaskResult:
    """Outputs -> task results; quantities are measured in the frame's calibrated ``regions``
    (``Frame.regions``), or over the whole frame with ``spacing`` when it has none, else in pixels.
    ``want_probabilities`` (``Frame.want_probabilities``): a segmentation also gives its labels' probabilities."""
    handler = _POSTPROCESSORS.get(manifest.task)
    if handler is None:
        raise BundleError(f"task {manifest_pb2.Task.Name(manifest.task)} has no postprocessor in this runtime version")
    calibrated = calibrated_regions(regions, spacing, geometry.frame_height, geometry.frame_width)
    task = handler(outputs, manifest, geometry, calibrated)
    if want_probabilities and manifest.task == manifest_pb2.TASK_SEGMENTATION:
        # Only when asked: a resize and, once encoded, a PNG per label.
        name = manifest.postprocessing.output or manifest.outputs[0].name
        task.probabilities = segmentation_probabilities(outputs[name], manifest.postprocessing.segmentation, geometry)
    return task


_POSTPROCESSORS: dict[int, Postprocessor] = {
    manifest_pb2.TASK_SEGMENTATION: postprocess_segmentation,
    manifest_pb2.TASK_CLASSIFICATION: postprocess_classification,
    manifest_pb2.TASK_DETECTION: postprocess_detection,
    manifest_pb2.TASK_IMAGE: postprocess_image,
    manifest_pb2.TASK_ANOMALY: postprocess_anomaly,
    manifest_pb2.TASK_REGISTRATION: postprocess_registration,
}
