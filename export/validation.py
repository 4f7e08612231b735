"""The accuracy gate: the exported model must reproduce the PyTorch original.

Both run on the same representative, preprocessed frames. Every task is
measured by the raw outputs' max/mean absolute error, and by what the
runtime would make of them:

=============== ===============================================================
segmentation     Dice and IoU of the masks
classification   top-1 agreement, largest difference of any class probability
detection        share of boxes matched (same class, IoU >= 0.5), their mean IoU
image            PSNR and SSIM of the 8-bit images
anomaly          largest difference of the anomaly score
registration     largest displacement difference (the raw error, in pixels)
=============== ===============================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.runtime.pipeline.postprocess import segmentation_mask
from edgescope.runtime.pipeline.tasks.classification import class_scores
from edgescope.runtime.pipeline.tasks.detection import Detections, box_iou, detect
from edgescope.runtime.pipeline.tasks.image import to_uint8
from edgescope.v1 import manifest_pb2

Array = npt.NDArray[np.float32]
# One sample's outputs: the task output alone, or every output by name.
Sample = npt.NDArray[np.generic] | Mapping[str, npt.NDArray[np.generic]]

MATCH_IOU = 0.5
# Identical images have no PSNR; report this ceiling instead of infinity.
PSNR_CEILING_DB = 100.0


@dataclass(frozen=True, slots=True)
class GateThresholds:
    """Per-metric limits; the defaults suit FP32 exports. Each task reads the ones it measures."""

    max_abs_error: float = 1e-3
    min_dice: float = 0.99
    min_iou: float = 0.98
    min_top1_agreement: float = 1.0
    max_probability_difference: float = 1e-3
    min_box_match: float = 1.0
    min_box_iou: float = 0.99
    min_psnr_db: float = 40.0
    min_ssim: float = 0.99
    max_score_difference: float = 1e-4


def dice(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    """Dice of the foreground (label > 0); two empty masks agree perfectly."""
    fa, fb = a > 0, b > 0
    total = int(fa.sum()) + int(fb.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(fa, fb).sum()) / total


def iou(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    """IoU of the foreground; two empty masks agree perfectly."""
    fa, fb = a > 0, b > 0
    union = int(np.logical_or(fa, fb).sum())
    return 1.0 if union == 0 else int(np.logical_and(fa, fb).sum()) / union


def psnr(reference: npt.NDArray[np.uint8], candidate: npt.NDArray[np.uint8]) -> float:
    """Peak signal-to-noise ratio of 8-bit images in dB (capped at ``PSNR_CEILING_DB``)."""
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CEILING_DB
    return min(PSNR_CEILING_DB, 10.0 * float(np.log10(255.0**2 / mse)))


def ssim(reference: npt.NDArray[np.uint8], candidate: npt.NDArray[np.uint8]) -> float:
    """Mean structural similarity of 8-bit images (Wang et al. 2004: 11x11 Gaussian, sigma 1.5).

    Colour images are measured per channel and averaged.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"SSIM needs images of one shape, got {reference.shape} and {candidate.shape}")
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    x, y = reference.astype(np.float64), candidate.astype(np.float64)

    def blur(image: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(cv2.GaussianBlur(image, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT), dtype=np.float64)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(index.mean())


def match_boxes(reference: Detections, candidate: Detections) -> tuple[int, list[float]]:
    """Greedy same-class matching by IoU; returns how many boxes are unmatched and the matched IoUs."""
    if not len(reference.boxes) or not len(candidate.boxes):
        return len(reference.boxes) + len(candidate.boxes), []
    overlaps = box_iou(reference.boxes, candidate.boxes)
    overlaps[reference.labels[:, None] != candidate.labels[None, :]] = 0.0
    matched: list[float] = []
    while overlaps.size and overlaps.max() >= MATCH_IOU:
        row, col = np.unravel_index(int(np.argmax(overlaps)), overlaps.shape)
        matched.append(float(overlaps[row, col]))
        overlaps[row, :] = 0.0
        overlaps[:, col] = 0.0
    unmatched = len(reference.boxes) + len(candidate.boxes) - 2 * len(matched)
    return unmatched, matched


def _metric(name: str, value: float, threshold: float, higher_is_better: bool) -> manifest_pb2.MetricValue:
    passed = value >= threshold if higher_is_better else value <= threshold
    return manifest_pb2.MetricValue(
        name=name, value=value, threshold=threshold, higher_is_better=higher_is_better, passed=passed
    )


def _named(sample: Sample, primary: str) -> dict[str, Array]:
    if isinstance(sample, Mapping):
        return {name: np.asarray(value, dtype=np.float32) for name, value in sample.items()}
    return {primary: np.asarray(sample, dtype=np.float32)}


def _task_metrics(
    reference: list[dict[str, Array]],
    candidate: list[dict[str, Array]],
    manifest: manifest_pb2.ModelManifest,
    primary: str,
    thresholds: GateThresholds,
) -> list[manifest_pb2.MetricValue]:
    post = manifest.postprocessing
    pairs = list(zip(reference, candidate, strict=True))
    task = manifest.task
    if task == manifest_pb2.TASK_SEGMENTATION:
        masks = [
            (segmentation_mask(r[primary], post.segmentation), segmentation_mask(c[primary], post.segmentation))
            for r, c in pairs
        ]
        dices = [dice(a, b) for a, b in masks]
        return [
            _metric("dice_min", min(dices), thresholds.min_dice, True),
            _metric("dice_mean", float(np.mean(dices)), thresholds.min_dice, True),
            _metric("iou_min", min(iou(a, b) for a, b in masks), thresholds.min_iou, True),
        ]
    if task == manifest_pb2.TASK_CLASSIFICATION:
        scores = [
            (class_scores(r[primary], post.classification), class_scores(c[primary], post.classification))
            for r, c in pairs
        ]
        agreement = float(np.mean([int(np.argmax(a) == np.argmax(b)) for a, b in scores]))
        difference = max(float(np.abs(a - b).max()) for a, b in scores)
        return [
            _metric("top1_agreement", agreement, thresholds.min_top1_agreement, True),
            _metric("max_probability_diff", difference, thresholds.max_probability_difference, False),
        ]
    if task == manifest_pb2.TASK_DETECTION:
        scores_name = post.detection.scores_output
        unmatched, ious, total = 0, [], 0
        for r, c in pairs:
            found_r = detect(r[primary], r[scores_name], post.detection)
            found_c = detect(c[primary], c[scores_name], post.detection)
            missing, matched = match_boxes(found_r, found_c)
            unmatched, total = unmatched + missing, total + len(found_r.boxes) + len(found_c.boxes)
            ious.extend(matched)
        return [
            _metric("box_match", 1.0 - unmatched / total if total else 1.0, thresholds.min_box_match, True),
            _metric("box_iou_mean", float(np.mean(ious)) if ious else 1.0, thresholds.min_box_iou, True),
        ]
    if task == manifest_pb2.TASK_IMAGE:
        images = [(to_uint8(r[primary], post.image), to_uint8(c[primary], post.image)) for r, c in pairs]
        return [
            _metric("psnr_min_db", min(psnr(a, b) for a, b in images), thresholds.min_psnr_db, True),
            _metric("ssim_min", min(ssim(a, b) for a, b in images), thresholds.min_ssim, True),
        ]
    if task == manifest_pb2.TASK_ANOMALY:
        difference = max(abs(float(r[primary].mean()) - float(c[primary].mean())) for r, c in pairs)
        flips = sum(
            int(
                (float(r[primary].mean()) > post.anomaly.score_threshold)
                != (float(c[primary].mean()) > post.anomaly.score_threshold)
            )
            for r, c in pairs
        )
        return [
            _metric("score_max_diff", difference, thresholds.max_score_difference, False),
            _metric("decision_agreement", 1.0 - flips / len(pairs), 1.0, True),
        ]
    return []


def compare(
    reference: Sequence[Sample],
    candidate: Sequence[Sample],
    manifest: manifest_pb2.ModelManifest,
    thresholds: GateThresholds,
) -> list[manifest_pb2.MetricValue]:
    """Task metrics of ``candidate`` against ``reference`` outputs, one pair per sample.

    A sample is either the task output's array or a mapping of every output by
    name (detection needs its scores too). Raw errors cover every output both sides have.
    """
    if len(reference) != len(candidate) or not reference:
        raise ValueError("compare needs the same, non-zero number of reference and candidate outputs")
    primary = manifest.postprocessing.output or (manifest.outputs[0].name if manifest.outputs else "output")
    refs = [_named(r, primary) for r in reference]
    cands = [_named(c, primary) for c in candidate]
    errors = [
        np.abs(r[name].astype(np.float64) - c[name].astype(np.float64)).reshape(-1)
        for r, c in zip(refs, cands, strict=True)
        for name in r
        if name in c
    ]
    if not errors:
        raise ValueError("reference and candidate share no output names")
    metrics = [
        _metric("max_abs_error", float(max(e.max() for e in errors)), thresholds.max_abs_error, False),
        # Informational: the mean has no limit of its own.
        _metric("mean_abs_error", float(np.mean([e.mean() for e in errors])), float("inf"), False),
    ]
    metrics.extend(_task_metrics(refs, cands, manifest, primary, thresholds))
    return metrics


def format_report(report: manifest_pb2.ValidationReport) -> str:
    lines = [
        f"accuracy gate: {report.candidate} vs {report.reference} on {report.samples} frames from {report.data_source}",
        f"  {'metric':<22}{'value':>14}{'limit':>12}  result",
    ]
    for metric in report.metrics:
        limit = (
            "-"
            if metric.threshold == float("inf")
            else f"{'>=' if metric.higher_is_better else '<='}{metric.threshold:g}"
        )
        lines.append(f"  {metric.name:<22}{metric.value:>14.6g}{limit:>12}  {'pass' if metric.passed else 'FAIL'}")
    verdict = "PASSED" if report.passed else ("FAILED (written anyway: forced)" if report.forced else "FAILED")
    lines.append(f"  gate {verdict}")
    return "\n".join(lines)
