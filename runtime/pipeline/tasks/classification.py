"""Classification: logits -> one score per label."""

from __future__ import annotations

from collections.abc import Sequence

from edgescope.errors import BackendError, BundleError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.confidence import classification_confidence
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.runtime.pipeline.tasks.common import FloatArray, TaskResult, activate, task_output
from edgescope.v1 import manifest_pb2, stream_pb2


def class_scores(logits: FloatArray, params: manifest_pb2.ClassificationParams) -> FloatArray:
    """Scores of one frame from ``(1, C)`` logits, after the manifest's activation."""
    if logits.ndim != 2 or logits.shape[0] != 1:
        raise BackendError(f"classification output has shape {logits.shape}; expected (1, classes)")
    return activate(logits[0], params.activation)


def postprocess_classification(
    outputs: Outputs,
    manifest: manifest_pb2.ModelManifest,
    geometry: Geometry,
    regions: Sequence[stream_pb2.CalibratedRegion],
) -> TaskResult:
    logits = task_output(outputs, manifest)
    scores = class_scores(logits, manifest.postprocessing.classification)
    labels = list(manifest.labels) or [f"class_{i}" for i in range(scores.size)]
    if len(labels) != scores.size:
        raise BundleError(f"the manifest names {len(labels)} labels, the model scores {scores.size} classes")
    return TaskResult(labels=labels, class_scores=scores, confidence=classification_confidence(logits))
