"""Flip test-time augmentation: a frame and its mirror image in one inference, their answers averaged.

The model input of one frame becomes a batch of two, the frame and its
horizontal flip (``flip_batch``), run as one inference; ``merge_flip`` turns
the two rows of every output back into one: the flipped row's maps mirrored
back (segmentation: the last axis is the width), then the two averaged as
probabilities (the manifest's activation: sigmoid, softmax, or none when the
model already outputs probabilities) and returned as scores of the same kind
as the model's own (logits for sigmoid and softmax), so the mask, the
confidence and the quantities are computed from the merged output exactly
as from a single pass. Only stateless, single-input segmentation and
classification models with a dynamic batch axis can run it (``tta_refusal``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.state import is_stateful, source_inputs
from edgescope.runtime.pipeline.tasks.common import sigmoid, softmax
from edgescope.v1 import manifest_pb2

OFF, FLIP = "off", "flip"
TTA_MODES = (OFF, FLIP)
_TASKS = {manifest_pb2.TASK_SEGMENTATION: "segmentation", manifest_pb2.TASK_CLASSIFICATION: "classification"}
# Probabilities are clipped this far from 0 and 1 before they become logits again.
_EPSILON = 1e-7
Floats = npt.NDArray[np.float32]


def tta_refusal(manifest: manifest_pb2.ModelManifest, dynamic_batch: bool) -> str | None:
    """Why flip test-time augmentation cannot run on this model (None: it can)."""
    if manifest.task not in _TASKS:
        return f"it is a {manifest_pb2.Task.Name(manifest.task)} model; flip applies to segmentation and classification"
    if not dynamic_batch:
        return (
            "its input has no dynamic batch axis, and a frame with its flip is a batch of two (export it again "
            "with a dynamic batch axis)"
        )
    if is_stateful(manifest):
        return "it carries state from frame to frame"
    if source_inputs(manifest):
        return "it takes frames of several sources"
    return None


def flip_batch(tensor: npt.NDArray[np.float32], layout: int) -> npt.NDArray[np.float32]:
    """A batch of one frame's input and its horizontal mirror image."""
    width_axis = 2 if layout == manifest_pb2.LAYOUT_NHWC else -1
    return np.concatenate([tensor, np.flip(tensor, axis=width_axis)])


def merge_flip(outputs: Outputs, manifest: manifest_pb2.ModelManifest) -> Outputs:
    """The two rows of each output (the frame's, its mirror image's) as one row, the mirror image's un-flipped."""
    segmentation = manifest.task == manifest_pb2.TASK_SEGMENTATION
    post = manifest.postprocessing
    main = post.output or manifest.outputs[0].name
    merged: Outputs = {}
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != 2:
            merged[name] = value
            continue
        own, mirrored = np.asarray(value[0:1], dtype=np.float32), np.asarray(value[1:2], dtype=np.float32)
        if segmentation and value.ndim >= 3:
            mirrored = np.flip(mirrored, axis=-1)
        if name != main:
            merged[name] = ((own + mirrored) / 2).astype(value.dtype)
        elif segmentation:
            merged[name] = _averaged(own, mirrored, _segmentation_kind(value, post.segmentation.activation), axis=1)
        else:
            merged[name] = _averaged(own, mirrored, _classification_kind(post.classification.activation), axis=-1)
    return merged


def _segmentation_kind(value: npt.NDArray[np.generic], activation: int) -> int:
    # As ``segmentation_mask`` reads it: several channels are always scores over classes.
    if activation == manifest_pb2.ACTIVATION_SOFTMAX or (value.ndim == 4 and value.shape[1] > 1):
        return manifest_pb2.ACTIVATION_SOFTMAX
    return activation


def _classification_kind(activation: int) -> int:
    # As the confidence reads it: logits, unless the model says its outputs are already scores.
    if activation in (manifest_pb2.ACTIVATION_SIGMOID, manifest_pb2.ACTIVATION_NONE):
        return activation
    return manifest_pb2.ACTIVATION_SOFTMAX


def _averaged(x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], activation: int, axis: int) -> Floats:
    """The mean of two outputs as probabilities, returned in the outputs' own kind (logits or probabilities)."""
    if activation == manifest_pb2.ACTIVATION_SIGMOID:
        p = np.clip((sigmoid(x) + sigmoid(y)) / 2, _EPSILON, 1 - _EPSILON)
        return np.asarray(np.log(p / (1 - p)), dtype=np.float32)
    if activation == manifest_pb2.ACTIVATION_SOFTMAX:
        p = (softmax(x, axis) + softmax(y, axis)) / 2
        return np.asarray(np.log(np.maximum(p, _EPSILON)), dtype=np.float32)
    return np.asarray((x + y) / 2, dtype=np.float32)
