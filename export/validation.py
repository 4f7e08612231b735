"""The accuracy gate: the exported model must reproduce the PyTorch original.

Both run on the same representative, preprocessed frames. Raw outputs are
compared by max/mean absolute error; segmentation models also by Dice
between the masks the runtime would produce from each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgescope.runtime.pipeline.postprocess import segmentation_mask
from edgescope.v1 import manifest_pb2

Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class GateThresholds:
    """Per-metric limits; the defaults suit FP32 exports."""

    max_abs_error: float = 1e-3
    min_dice: float = 0.99


def dice(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    """Dice of the foreground (label > 0); two empty masks agree perfectly."""
    fa, fb = a > 0, b > 0
    total = int(fa.sum()) + int(fb.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(fa, fb).sum()) / total


def _metric(name: str, value: float, threshold: float, higher_is_better: bool) -> manifest_pb2.MetricValue:
    passed = value >= threshold if higher_is_better else value <= threshold
    return manifest_pb2.MetricValue(
        name=name, value=value, threshold=threshold, higher_is_better=higher_is_better, passed=passed
    )


def compare(
    reference: Sequence[Array],
    candidate: Sequence[Array],
    manifest: manifest_pb2.ModelManifest,
    thresholds: GateThresholds,
) -> list[manifest_pb2.MetricValue]:
    """Task metrics of ``candidate`` against ``reference`` outputs, one pair per sample."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError("compare needs the same, non-zero number of reference and candidate outputs")
    errors = [np.abs(r.astype(np.float64) - c.astype(np.float64)) for r, c in zip(reference, candidate, strict=True)]
    metrics = [
        _metric("max_abs_error", float(max(e.max() for e in errors)), thresholds.max_abs_error, False),
        # Informational: the mean has no limit of its own.
        _metric("mean_abs_error", float(np.mean([e.mean() for e in errors])), float("inf"), False),
    ]
    if manifest.task == manifest_pb2.TASK_SEGMENTATION:
        params = manifest.postprocessing.segmentation
        scores = [
            dice(segmentation_mask(r, params), segmentation_mask(c, params))
            for r, c in zip(reference, candidate, strict=True)
        ]
        metrics.append(_metric("dice_min", min(scores), thresholds.min_dice, True))
        metrics.append(_metric("dice_mean", float(np.mean(scores)), thresholds.min_dice, True))
    return metrics


def format_report(report: manifest_pb2.ValidationReport) -> str:
    lines = [
        f"accuracy gate: {report.candidate} vs {report.reference} on {report.samples} frames from {report.data_source}",
        f"  {'metric':<16}{'value':>14}{'limit':>12}  result",
    ]
    for metric in report.metrics:
        limit = (
            "-"
            if metric.threshold == float("inf")
            else f"{'>=' if metric.higher_is_better else '<='}{metric.threshold:g}"
        )
        lines.append(f"  {metric.name:<16}{metric.value:>14.6g}{limit:>12}  {'pass' if metric.passed else 'FAIL'}")
    verdict = "PASSED" if report.passed else ("FAILED (written anyway: forced)" if report.forced else "FAILED")
    lines.append(f"  gate {verdict}")
    return "\n".join(lines)
