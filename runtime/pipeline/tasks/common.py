"""What every task postprocessor shares: the result holder and the map back to the frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, cast

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import BundleError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.v1 import manifest_pb2, stream_pb2

FloatArray = npt.NDArray[np.float32]
# An output map: float values, or an 8-bit rendering of them.
Plane = TypeVar("Plane", npt.NDArray[np.float32], npt.NDArray[np.uint8])


@dataclass(slots=True)
class TaskResult:
    """What postprocessing produced for one frame, before encoding."""

    mask: npt.NDArray[np.uint8] | None = None
    labels: list[str] = field(default_factory=list)
    quantities: list[stream_pb2.Quantity] = field(default_factory=list)
    # Classification: one score per label.
    class_scores: FloatArray | None = None
    # Detection: the boxes found (an empty list when none were).
    boxes: list[stream_pb2.Box] | None = None
    # 8-bit gray (H, W) or RGB (H, W, 3) images, sent as PNG.
    images: dict[str, npt.NDArray[np.uint8]] = field(default_factory=dict)
    # Float tensors sent as they are (displacement fields).
    tensors: dict[str, FloatArray] = field(default_factory=dict)
    # How sure the model is of this answer (``confidence``); None for tasks without one.
    confidence: float | None = None
    # Segmentation, when the frame asked: each label after the background's probability, 8-bit (v/255),
    # ``(labels - 1, H, W)`` at the mask's size.
    probabilities: npt.NDArray[np.uint8] | None = None


def task_output(outputs: Outputs, manifest: manifest_pb2.ModelManifest, name: str = "") -> FloatArray:
    """The named output (default: the postprocessing output) as float32."""
    wanted = name or manifest.postprocessing.output or manifest.outputs[0].name
    if wanted not in outputs:
        raise BundleError(f"model output {wanted!r} named in the manifest was not produced")
    return np.asarray(outputs[wanted], dtype=np.float32)


def sigmoid(x: FloatArray) -> FloatArray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))).astype(np.float32)


def softmax(x: FloatArray, axis: int = -1) -> FloatArray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=axis, keepdims=True), dtype=np.float32)


def activate(x: FloatArray, activation: int, axis: int = -1) -> FloatArray:
    if activation == manifest_pb2.ACTIVATION_SOFTMAX:
        return softmax(x, axis)
    if activation == manifest_pb2.ACTIVATION_SIGMOID:
        return sigmoid(x)
    return x


def frame_region(plane: Plane, geometry: Geometry, input_height: int) -> Plane:
    """The part of an output map that covers the frame (letterbox bars cut off).

    Outputs may be finer or coarser than the input (super-resolution); the cut
    scales with the ratio of output to input height.
    """
    factor = plane.shape[0] / input_height
    top, left = round(geometry.top * factor), round(geometry.left * factor)
    bottom, right = round((geometry.top + geometry.height) * factor), round((geometry.left + geometry.width) * factor)
    return plane[top:bottom, left:right]


def resize_to(plane: Plane, height: int, width: int) -> Plane:
    """Bilinear resize of an (H, W) or (H, W, C) map; a no-op at the same size."""
    if plane.shape[:2] == (height, width):
        return plane
    shrinking = height < plane.shape[0] and width < plane.shape[1]
    resized = cv2.resize(plane, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return cast(Plane, np.asarray(resized, dtype=plane.dtype))
