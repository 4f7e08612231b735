"""How sure the model is of one answer, from its own output: cheap, and no substitute for the domain check.

- segmentation: 1 - the mean normalised predictive entropy (entropy over
  log(classes), 0 for a one-hot pixel, 1 for a uniform one) over the pixels
  of the mask, per label and over every label together; over the whole frame
  when nothing was found (how sure the model is that nothing is there);
- classification: the largest softmax probability.

A model can be confidently wrong, above all on frames unlike its training
data; a low confidence says the answer is uncertain, a high one does not say
it is right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgescope.runtime.pipeline.tasks.common import sigmoid, softmax
from edgescope.v1 import manifest_pb2

# Every 2nd row and column: the mean entropy of a quarter of the pixels is that of all of them, to 1e-3.
_STEP = 2


@dataclass(frozen=True, slots=True)
class SegmentationConfidence:
    frame: float
    # By label index (1, 2, ...): labels found in the frame.
    labels: dict[int, float] = field(default_factory=dict)


def segmentation_confidence(
    logits: npt.NDArray[np.generic], params: manifest_pb2.SegmentationParams
) -> SegmentationConfidence:
    """From ``(1, C, H, W)`` or ``(1, H, W)`` scores, as ``segmentation_mask`` reads them."""
    scores = np.asarray(logits, dtype=np.float32)
    scores = scores[0] if scores.ndim == 4 else scores
    scores = scores[None] if scores.ndim == 2 else scores
    scores = scores[:, ::_STEP, ::_STEP]
    if params.activation == manifest_pb2.ACTIVATION_SOFTMAX or scores.shape[0] > 1:
        probabilities = softmax(scores, axis=0)
        mask = probabilities.argmax(axis=0)
    else:
        activated = params.activation == manifest_pb2.ACTIVATION_SIGMOID
        foreground = sigmoid(scores[0]) if activated else np.clip(scores[0], 0.0, 1.0)
        probabilities = np.stack([1.0 - foreground, foreground])
        mask = (foreground > (params.threshold or 0.5)).astype(np.intp)
    clipped = np.clip(probabilities, 1e-7, 1.0)
    entropy = -(clipped * np.log(clipped)).sum(axis=0) / math.log(probabilities.shape[0])
    sure = 1.0 - entropy
    found = mask > 0
    frame = float(sure[found].mean()) if found.any() else float(sure.mean())
    labels = {int(label): float(sure[mask == label].mean()) for label in np.unique(mask[found])}
    return SegmentationConfidence(frame, labels)


def classification_confidence(logits: npt.NDArray[np.float32]) -> float:
    """The largest softmax probability of ``(1, C)`` logits."""
    return float(softmax(np.asarray(logits, dtype=np.float32).reshape(-1)).max())
