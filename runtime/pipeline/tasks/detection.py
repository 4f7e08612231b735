"""Detection: raw boxes and class scores -> filtered, non-overlapping boxes in frame pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgescope.errors import BackendError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.runtime.pipeline.tasks.common import FloatArray, TaskResult, activate, task_output
from edgescope.v1 import manifest_pb2, stream_pb2

DEFAULT_MAX_BOXES = 100


@dataclass(frozen=True, slots=True)
class Detections:
    """``boxes`` (N, 4) as x_min, y_min, x_max, y_max; ``scores`` (N,); ``labels`` (N,) class indices."""

    boxes: FloatArray
    scores: FloatArray
    labels: npt.NDArray[np.int64]


def to_xyxy(boxes: FloatArray, box_format: int) -> FloatArray:
    if box_format == manifest_pb2.BOX_FORMAT_XYWH:
        x, y, w, h = boxes.T
        return np.stack([x, y, x + w, y + h], axis=1)
    if box_format == manifest_pb2.BOX_FORMAT_CXCYWH:
        cx, cy, w, h = boxes.T
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes


def box_iou(a: FloatArray, b: FloatArray) -> FloatArray:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M)."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0).astype(np.float32)


def nms(boxes: FloatArray, scores: FloatArray, iou_threshold: float) -> npt.NDArray[np.int64]:
    """Greedy non-maximum suppression; indices of the kept boxes, best first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        overlaps = box_iou(boxes[best : best + 1], boxes[order[1:]])[0]
        order = order[1:][overlaps <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def detect(raw_boxes: FloatArray, raw_scores: FloatArray, params: manifest_pb2.DetectionParams) -> Detections:
    """Score filter, per-class NMS and the box limit, in model-input pixels."""
    if raw_boxes.ndim != 3 or raw_boxes.shape[0] != 1 or raw_boxes.shape[2] != 4:
        raise BackendError(f"detection boxes have shape {raw_boxes.shape}; expected (1, N, 4)")
    if raw_scores.ndim != 3 or raw_scores.shape[:2] != raw_boxes.shape[:2]:
        raise BackendError(f"detection scores have shape {raw_scores.shape}; expected (1, {raw_boxes.shape[1]}, C)")
    boxes = to_xyxy(raw_boxes[0], params.box_format)
    probs = activate(raw_scores[0], params.activation)
    labels = np.argmax(probs, axis=1)
    scores = probs[np.arange(probs.shape[0]), labels]
    keep = scores >= params.score_threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    # Offsetting each class far apart makes one NMS pass act per class.
    offset = (labels.astype(np.float32) * (float(np.abs(boxes).max(initial=0.0)) + 1.0))[:, None]
    kept = nms(boxes + offset, scores, params.iou_threshold or 0.5)[: params.max_boxes or DEFAULT_MAX_BOXES]
    return Detections(boxes[kept], scores[kept], labels[kept].astype(np.int64))


def to_frame_pixels(detections: Detections, geometry: Geometry) -> Detections:
    """Undo the letterbox and the resize, and clip to the frame."""
    sx = geometry.frame_width / geometry.width
    sy = geometry.frame_height / geometry.height
    shift = np.array([geometry.left, geometry.top, geometry.left, geometry.top], dtype=np.float32)
    scale = np.array([sx, sy, sx, sy], dtype=np.float32)
    boxes = (detections.boxes - shift) * scale
    limit = np.array([geometry.frame_width, geometry.frame_height] * 2, dtype=np.float32)
    return Detections(np.clip(boxes, 0.0, limit).astype(np.float32), detections.scores, detections.labels)


def postprocess_detection(
    outputs: Outputs,
    manifest: manifest_pb2.ModelManifest,
    geometry: Geometry,
    regions: Sequence[stream_pb2.CalibratedRegion],
) -> TaskResult:
    params = manifest.postprocessing.detection
    found = detect(task_output(outputs, manifest), task_output(outputs, manifest, params.scores_output), params)
    found = to_frame_pixels(found, geometry)
    labels = list(manifest.labels)
    boxes = [
        stream_pb2.Box(
            x_min=float(box[0]),
            y_min=float(box[1]),
            x_max=float(box[2]),
            y_max=float(box[3]),
            score=float(score),
            label_index=int(label),
            label=labels[label] if label < len(labels) else str(label),
        )
        for box, score, label in zip(found.boxes, found.scores, found.labels, strict=True)
    ]
    quantities = [stream_pb2.Quantity(name="detections", value=float(len(boxes)), unit="1")]
    return TaskResult(labels=labels, boxes=boxes, quantities=quantities)
