"""Task metrics: how far a candidate's outputs are from a reference's, frame by frame.

Every task is measured by the raw outputs' error against a tolerance that
scales with them (``error_vs_tolerance``: the largest ``|candidate -
reference| / (atol + rtol * |reference|)`` of a frame, at most 1; see
``limits``), with the error's distribution reported beside it (absolute and
relative: median, p99, max), and by what the runtime makes of them (its own
postprocessing code):

=============== ===============================================================
segmentation     Dice of the masks: the mean, and the worst frame (a floor)
classification   top-1 agreement, largest difference of any class probability
detection        share of boxes matched (same class, IoU >= 0.5), their mean IoU
image            PSNR and SSIM of the 8-bit images (worst frame)
anomaly          largest difference of the anomaly score, decisions that agree
registration     largest displacement difference (the raw error, in pixels)
=============== ===============================================================

A metric's limit is a floor every frame must reach (``per_frame``; its value
is the worst frame's and it counts the frames that miss) or an aggregate over
the frames (a mean, a share). ``per_frame_only`` keeps the floors and reports
aggregates without a limit; a share that must be 1.0 is a floor too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.runtime.evaluation.limits import GateThresholds
from edgescope.runtime.pipeline.postprocess import segmentation_mask
from edgescope.runtime.pipeline.tasks.classification import class_scores
from edgescope.runtime.pipeline.tasks.detection import Detections, box_iou, detect
from edgescope.runtime.pipeline.tasks.image import to_uint8
from edgescope.v1 import manifest_pb2

Array = npt.NDArray[np.float32]
# One frame's outputs: the task output alone, or every output by name.
Sample = npt.NDArray[np.generic] | Mapping[str, npt.NDArray[np.generic]]

# What every task reports of the raw outputs: the one limited (error_vs_tolerance), and the error's distribution.
RAW_ERROR_METRICS = frozenset(
    {
        "error_vs_tolerance",
        "max_abs_error",
        "mean_abs_error",
        "abs_error_p50",
        "abs_error_p99",
        "rel_error_p50",
        "rel_error_p99",
        "rel_error_max",
    }
)
MATCH_IOU = 0.5
# Identical images have no PSNR; report this ceiling instead of infinity.
PSNR_CEILING_DB = 100.0
NO_LIMIT = float("inf")


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


def _no_limit(higher_is_better: bool) -> float:
    return -NO_LIMIT if higher_is_better else NO_LIMIT


def _meets(value: float, threshold: float, higher_is_better: bool) -> bool:
    return value >= threshold if higher_is_better else value <= threshold


def _floor(name: str, values: Sequence[float], threshold: float, higher_is_better: bool) -> manifest_pb2.MetricValue:
    """A limit every frame must meet; the value is the worst frame's."""
    order = np.argmin(values) if higher_is_better else np.argmax(values)
    worst = int(order)
    failed = sum(not _meets(v, threshold, higher_is_better) for v in values)
    return manifest_pb2.MetricValue(
        name=name,
        value=float(values[worst]),
        threshold=threshold,
        higher_is_better=higher_is_better,
        passed=failed == 0,
        per_frame=True,
        frames_failed=failed,
        worst_frame=worst,
    )


def _aggregate(
    name: str, value: float, threshold: float, higher_is_better: bool, per_frame_only: bool
) -> manifest_pb2.MetricValue:
    if per_frame_only:
        threshold = _no_limit(higher_is_better)
    return manifest_pb2.MetricValue(
        name=name,
        value=value,
        threshold=threshold,
        higher_is_better=higher_is_better,
        passed=_meets(value, threshold, higher_is_better),
    )


def _share(
    name: str, value: float, frame_ok: Sequence[bool], threshold: float, per_frame_only: bool
) -> manifest_pb2.MetricValue:
    """A share that must reach ``threshold``; when that is 1.0 every frame must agree (a floor)."""
    if threshold < 1.0:
        return _aggregate(name, value, threshold, True, per_frame_only)
    failing = [i for i, ok in enumerate(frame_ok) if not ok]
    return manifest_pb2.MetricValue(
        name=name,
        value=value,
        threshold=threshold,
        higher_is_better=True,
        passed=value >= threshold,
        per_frame=True,
        frames_failed=len(failing),
        worst_frame=failing[0] if failing else 0,
    )


def _tolerance_ratio(
    error: npt.NDArray[np.float64], magnitude: npt.NDArray[np.float64], limits: GateThresholds
) -> float:
    """The largest ``error / (atol + rtol * max(|reference|, mean |reference|))``: at most 1 when every
    element is within tolerance. Near a zero crossing an element's rounding is the size of the output's
    values, not of its own, so the relative term never falls below the output's mean magnitude."""
    if not error.size:
        return 0.0
    allowed = limits.max_abs_error + limits.rtol * np.maximum(magnitude, magnitude.mean())
    if np.isinf(allowed).all():
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, error / allowed, np.where(error > 0, np.inf, 0.0))
    return float(np.nanmax(ratio))


def _named(sample: Sample, primary: str) -> dict[str, Array]:
    if isinstance(sample, Mapping):
        return {name: np.asarray(value, dtype=np.float32) for name, value in sample.items()}
    return {primary: np.asarray(sample, dtype=np.float32)}


@dataclass(frozen=True, slots=True)
class Comparison:
    """The metrics; per frame, the task's agreement score (segmentation: Dice; else none) and the raw error."""

    metrics: list[manifest_pb2.MetricValue]
    frame_scores: list[float] | None
    frame_errors: list[float]


def _task_metrics(
    pairs: list[tuple[dict[str, Array], dict[str, Array]]],
    manifest: manifest_pb2.ModelManifest,
    primary: str,
    limits: GateThresholds,
    per_frame_only: bool,
) -> tuple[list[manifest_pb2.MetricValue], list[float] | None]:
    post = manifest.postprocessing
    task = manifest.task
    if task == manifest_pb2.TASK_SEGMENTATION:
        masks = [
            (segmentation_mask(r[primary], post.segmentation), segmentation_mask(c[primary], post.segmentation))
            for r, c in pairs
        ]
        dices = [dice(a, b) for a, b in masks]
        return [
            _floor("dice_min", dices, limits.min_frame_dice, True),
            _aggregate("dice_mean", float(np.mean(dices)), limits.min_dice, True, per_frame_only),
            _floor("iou_min", [iou(a, b) for a, b in masks], -NO_LIMIT, True),
        ], dices
    if task == manifest_pb2.TASK_CLASSIFICATION:
        scores = [
            (class_scores(r[primary], post.classification), class_scores(c[primary], post.classification))
            for r, c in pairs
        ]
        agree = [bool(np.argmax(a) == np.argmax(b)) for a, b in scores]
        return [
            _share("top1_agreement", float(np.mean(agree)), agree, limits.min_top1_agreement, per_frame_only),
            _floor(
                "max_probability_diff",
                [float(np.abs(a - b).max()) for a, b in scores],
                limits.max_probability_difference,
                False,
            ),
        ], None
    if task == manifest_pb2.TASK_DETECTION:
        scores_name = post.detection.scores_output
        unmatched, ious, total, all_matched = 0, [], 0, []
        for r, c in pairs:
            found_r = detect(r[primary], r[scores_name], post.detection)
            found_c = detect(c[primary], c[scores_name], post.detection)
            missing, matched = match_boxes(found_r, found_c)
            unmatched, total = unmatched + missing, total + len(found_r.boxes) + len(found_c.boxes)
            ious.extend(matched)
            all_matched.append(missing == 0)
        share = 1.0 - unmatched / total if total else 1.0
        mean_iou = float(np.mean(ious)) if ious else 1.0
        return [
            _share("box_match", share, all_matched, limits.min_box_match, per_frame_only),
            _aggregate("box_iou_mean", mean_iou, limits.min_box_iou, True, per_frame_only),
        ], None
    if task == manifest_pb2.TASK_IMAGE:
        images = [(to_uint8(r[primary], post.image), to_uint8(c[primary], post.image)) for r, c in pairs]
        return [
            _floor("psnr_min_db", [psnr(a, b) for a, b in images], limits.min_psnr_db, True),
            _floor("ssim_min", [ssim(a, b) for a, b in images], limits.min_ssim, True),
        ], None
    if task == manifest_pb2.TASK_ANOMALY:
        threshold = post.anomaly.score_threshold
        score_pairs = [(float(r[primary].mean()), float(c[primary].mean())) for r, c in pairs]
        agree = [(a > threshold) == (b > threshold) for a, b in score_pairs]
        return [
            _floor("score_max_diff", [abs(a - b) for a, b in score_pairs], limits.max_score_difference, False),
            _share("decision_agreement", float(np.mean(agree)), agree, 1.0, per_frame_only),
        ], None
    return [], None


def compare_frames(
    reference: Sequence[Sample],
    candidate: Sequence[Sample],
    manifest: manifest_pb2.ModelManifest,
    limits: GateThresholds,
    *,
    per_frame_only: bool = False,
) -> Comparison:
    """Task metrics of ``candidate`` against ``reference`` outputs, one pair per frame.

    A sample is either the task output's array or a mapping of every output by
    name (detection needs its scores too). Raw errors cover every output both sides have.
    """
    if len(reference) != len(candidate) or not reference:
        raise ValueError("compare needs the same, non-zero number of reference and candidate outputs")
    primary = manifest.postprocessing.output or (manifest.outputs[0].name if manifest.outputs else "output")
    pairs = [(_named(r, primary), _named(c, primary)) for r, c in zip(reference, candidate, strict=True)]
    frame_errors: list[list[npt.NDArray[np.float64]]] = []
    frame_ratios: list[float] = []
    magnitudes: list[npt.NDArray[np.float64]] = []
    for r, c in pairs:
        errors, ratio = [], 0.0
        for name in (n for n in r if n in c):
            reference_values = r[name].astype(np.float64).reshape(-1)
            error = np.abs(reference_values - c[name].astype(np.float64).reshape(-1))
            errors.append(error)
            magnitudes.append(np.abs(reference_values))
            ratio = max(ratio, _tolerance_ratio(error, np.abs(reference_values), limits))
        frame_errors.append(errors)
        frame_ratios.append(ratio)
    if not all(frame_errors):
        raise ValueError("reference and candidate share no output names")
    max_errors = [max(float(e.max()) if e.size else 0.0 for e in errors) for errors in frame_errors]
    mean_error = float(np.mean([e.mean() for errors in frame_errors for e in errors if e.size]))
    every = np.concatenate([e for errors in frame_errors for e in errors])
    scale = np.concatenate(magnitudes)
    # Relative error where the reference is not (about) zero: elsewhere only the absolute one means anything.
    relative = every[scale > 1e-6] / scale[scale > 1e-6]
    metrics = [
        _floor("error_vs_tolerance", frame_ratios, 1.0, False),
        _aggregate("max_abs_error", max(max_errors), NO_LIMIT, False, per_frame_only),
        _aggregate("mean_abs_error", mean_error, NO_LIMIT, False, per_frame_only),
        _aggregate("abs_error_p50", float(np.percentile(every, 50)), NO_LIMIT, False, per_frame_only),
        _aggregate("abs_error_p99", float(np.percentile(every, 99)), NO_LIMIT, False, per_frame_only),
    ]
    if relative.size:
        metrics += [
            _aggregate("rel_error_p50", float(np.percentile(relative, 50)), NO_LIMIT, False, per_frame_only),
            _aggregate("rel_error_p99", float(np.percentile(relative, 99)), NO_LIMIT, False, per_frame_only),
            _aggregate("rel_error_max", float(relative.max()), NO_LIMIT, False, per_frame_only),
        ]
    task_metrics, task_scores = _task_metrics(pairs, manifest, primary, limits, per_frame_only)
    metrics.extend(task_metrics)
    return Comparison(metrics, task_scores, max_errors)


def compare(
    reference: Sequence[Sample],
    candidate: Sequence[Sample],
    manifest: manifest_pb2.ModelManifest,
    limits: GateThresholds,
    *,
    per_frame_only: bool = False,
) -> list[manifest_pb2.MetricValue]:
    """The metrics of ``compare_frames``."""
    return compare_frames(reference, candidate, manifest, limits, per_frame_only=per_frame_only).metrics
