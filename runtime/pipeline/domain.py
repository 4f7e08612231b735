"""Does a frame look like what the model was validated on? Cheap features, a profile, a score.

One evaluator for both ends: export computes ``frame_features`` on its
reference frames and fits a ``DomainProfile`` (``fit_profile``); the runtime
computes the same features on every frame and scores them against it
(``DomainScorer``). Features are those of the model's own view of the frame
(its preprocessed input tensor) and of what it answered:

- input, per channel: the 1st, 50th and 99th percentiles, the share of
  values at the channel's saturation value, the sharpness (mean absolute
  Laplacian) and a noise estimate (median absolute deviation of the frame
  less its 3x3 blur), the texture measured at half resolution;
- segmentation: the mask's share of the frame, and the mean predictive
  entropy inside and outside it; classification: the largest class
  probability, the entropy and the energy (minus log-sum-exp of the logits).

The score is the Mahalanobis distance of the standardised features from the
reference frames' (covariance shrunk towards the identity, so a few dozen
frames give a usable inverse). The threshold is set at export for a stated
false-alarm rate from frames kept out of the fit: their squared distances,
matched by moments to a scaled chi-square, give the quantile (Wilson and
Hilferty's approximation). The streams' drift test (``drift``) takes its
reference from contiguous blocks of the reference frames instead, each
scored by a fit on the others: a stream's next frames are further from the
fit than frames interleaved with it. What it cannot see: a shift that leaves these
statistics as they were (a different anatomy of the same brightness and
texture, a subtle artefact), and one that the reference frames already
spanned; the score says the frame is unusual, not that the answer is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.drift import DEFAULT_FALSE_ALARM_HOURS, cusum_threshold, false_alarm_frames
from edgescope.runtime.pipeline.preprocess import input_channels
from edgescope.v1 import manifest_pb2

# Every 4th row and column: percentiles of 4,096 values describe a 256x256 plane as well as 65,536 do.
_STEP = 4
_SHRINKAGE = 0.1
DEFAULT_FALSE_ALARM_RATE = 1e-3
HELD_OUT_SHARE = 1 / 3
# Contiguous blocks of the reference frames, for the drift test's reference (see ``fit_profile``).
DRIFT_BLOCKS = 4
# How many of the furthest features a result names.
FURTHEST = 3

Floats = npt.NDArray[np.float64]


def feature_names(manifest: manifest_pb2.ModelManifest) -> list[str]:
    channels = input_channels(manifest.preprocessing)
    names = [
        f"input{c}_{stat}" for c in range(channels) for stat in ("p01", "p50", "p99", "saturated", "sharpness", "noise")
    ]
    if manifest.task == manifest_pb2.TASK_SEGMENTATION:
        names += ["mask_fraction", "entropy_inside", "entropy_outside"]
    elif manifest.task == manifest_pb2.TASK_CLASSIFICATION:
        names += ["max_probability", "entropy", "energy"]
    return names


def frame_features(tensor: npt.NDArray[np.float32], outputs: Outputs, manifest: manifest_pb2.ModelManifest) -> Floats:
    """The features of one frame: its model input (batch of one) and the model's outputs for it."""
    spec = manifest.preprocessing
    planes = tensor[0] if spec.layout != manifest_pb2.LAYOUT_NHWC else np.moveaxis(tensor[0], -1, 0)
    values: list[float] = []
    for channel, plane in enumerate(planes):
        ordered = np.sort(plane[::_STEP, ::_STEP], axis=None)
        low, mid, high = (float(ordered[int(q * (ordered.size - 1))]) for q in (0.01, 0.5, 0.99))
        saturated = float(np.mean(ordered >= _saturation(spec, channel) - 1e-6))
        # Texture at half resolution: a quarter of the work, the same ordering of frames.
        half = np.ascontiguousarray(plane[::2, ::2], dtype=np.float32)
        sharpness = float(np.mean(np.abs(cv2.Laplacian(half, cv2.CV_32F))))
        residual = np.sort((half - cv2.blur(half, (3, 3)))[:: _STEP // 2, :: _STEP // 2], axis=None)
        deviation = np.sort(np.abs(residual - residual[residual.size // 2]))
        noise = float(deviation[deviation.size // 2]) * 1.4826
        values += [low, mid, high, saturated, sharpness, noise]
    values += _output_features(outputs, manifest)
    return np.asarray(values, dtype=np.float64)


def _saturation(spec: manifest_pb2.Preprocessing, channel: int) -> float:
    """The value a full-scale (255) pixel of this channel has in the model's input."""
    mean = spec.mean[channel if len(spec.mean) > 1 else 0] if spec.mean else 0.0
    std = spec.std[channel if len(spec.std) > 1 else 0] if spec.std else 1.0
    return (255.0 * (spec.scale or 1.0) - mean) / std


def _entropy(probabilities: Floats, axis: int) -> Floats:
    clipped = np.clip(probabilities, 1e-7, 1.0)
    return np.asarray(-(clipped * np.log(clipped)).sum(axis=axis), dtype=np.float64)


def _output_features(outputs: Outputs, manifest: manifest_pb2.ModelManifest) -> list[float]:
    name = manifest.postprocessing.output or manifest.outputs[0].name
    if manifest.task not in (manifest_pb2.TASK_SEGMENTATION, manifest_pb2.TASK_CLASSIFICATION):
        return []
    logits = np.asarray(outputs[name], dtype=np.float32)[0]
    if manifest.task == manifest_pb2.TASK_CLASSIFICATION:
        flat = logits.reshape(-1)
        top = flat.max()
        exp = np.exp(flat - top)
        probabilities = exp / exp.sum()
        energy = -(top + math.log(float(exp.sum())))
        return [float(probabilities.max()), float(_entropy(probabilities, 0)), float(energy)]
    scores = logits[..., ::_STEP, ::_STEP] if logits.ndim == 3 else logits[None, ::_STEP, ::_STEP]
    if scores.shape[0] > 1:
        exp = np.exp(scores - scores.max(axis=0, keepdims=True))
        probabilities = exp / exp.sum(axis=0, keepdims=True)
        mask = probabilities.argmax(axis=0) > 0
        entropy = _entropy(probabilities, 0)
    else:
        activated = manifest.postprocessing.segmentation.activation == manifest_pb2.ACTIVATION_SIGMOID
        foreground = 1.0 / (1.0 + np.exp(-np.clip(scores[0], -60, 60))) if activated else np.clip(scores[0], 0, 1)
        mask = foreground > (manifest.postprocessing.segmentation.threshold or 0.5)
        entropy = _entropy(np.stack([foreground, 1.0 - foreground]), 0)
    inside = float(entropy[mask].mean()) if mask.any() else 0.0
    outside = float(entropy[~mask].mean()) if (~mask).any() else 0.0
    return [float(mask.mean()), inside, outside]


def fit_profile(
    features: Floats,
    names: list[str],
    data_source: str,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
) -> manifest_pb2.DomainProfile:
    """The profile of reference frames (one row each, in recording order): fitted on two thirds, thresholded
    on the rest; the drift test's reference from contiguous blocks, each scored by a fit on the others."""
    count = len(features)
    held = max(1, round(count * HELD_OUT_SHARE))
    if count - held < 2:
        raise ValueError(f"a domain profile needs at least 3 reference frames, not {count}")
    # Every third frame held out, so both parts span the whole recording.
    held_out = np.arange(count) % 3 == 2 if count >= 3 else np.zeros(count, dtype=bool)
    fit, rest = features[~held_out], features[held_out]
    arrays = _fit(fit)
    profile = manifest_pb2.DomainProfile(
        features=names,
        mean=arrays.mean.tolist(),
        scale=arrays.scale.tolist(),
        precision=arrays.precision.reshape(-1).tolist(),
        false_alarm_rate=false_alarm_rate,
        fit_frames=len(fit),
        held_out_frames=len(rest),
        data_source=data_source,
    )
    squared = np.asarray([_distance(arrays, row) ** 2 for row in rest])
    mean = float(squared.mean())
    if mean > 0:
        spread, degrees = _scaled_chi_square(squared)
        profile.threshold = math.sqrt(max(_chi_square_quantile(spread, degrees, 1.0 - false_alarm_rate), mean))
    else:
        profile.threshold = 1e-6
    profile.held_out_above = float(np.mean(np.sqrt(squared) > profile.threshold))
    # Frames interleaved with the fit's are close to their neighbours in it; a stream's next minutes are not.
    # The drift test adds up many frames, so its reference must be the latter, or in-domain video drifts.
    if count >= DRIFT_BLOCKS * 3:
        block = np.arange(count) * DRIFT_BLOCKS // count
        blocks = np.asarray(
            [
                _distance(_fit(features[block != b]), row) ** 2
                for b in range(DRIFT_BLOCKS)
                for row in features[block == b]
            ]
        )
        if float(blocks.mean()) > 0:
            profile.score_spread, profile.score_degrees = _scaled_chi_square(blocks)
    return profile


def _fit(rows: Floats) -> _Arrays:
    mean = rows.mean(axis=0)
    scale = np.maximum(rows.std(axis=0), 1e-6)
    standard = (rows - mean) / scale
    size = rows.shape[1]
    covariance = np.cov(standard, rowvar=False) if len(standard) > 1 else np.eye(size)
    precision = np.linalg.inv((1 - _SHRINKAGE) * np.atleast_2d(covariance) + _SHRINKAGE * np.eye(size))
    return _Arrays(mean, scale, np.asarray(precision, dtype=np.float64))


def _scaled_chi_square(squared: Floats) -> tuple[float, float]:
    """``spread`` and ``degrees`` of the scaled chi-square, spread * chi2(degrees), with the moments of ``squared``."""
    mean = float(squared.mean())
    variance = float(squared.var()) if len(squared) > 1 else mean
    spread = max(variance, 1e-12) / (2 * mean)
    return spread, max(mean / spread, 0.5)


def _chi_square_quantile(spread: float, degrees: float, probability: float) -> float:
    """The ``probability`` quantile of spread * chi2(degrees) (Wilson and Hilferty)."""
    z = NormalDist().inv_cdf(probability)
    return float(spread * degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3)


def normal_score(score: float, profile: manifest_pb2.DomainProfile) -> float:
    """A frame's distance on a standard normal scale against the profile's drift reference (Wilson and
    Hilferty's cube root of spread * chi2(degrees)): in-domain frames have mean 0 and deviation 1.
    0 when the profile has no drift reference."""
    spread, degrees = profile.score_spread, profile.score_degrees
    if spread <= 0 or degrees <= 0:
        return 0.0
    ratio = float(score * score / (spread * degrees)) ** (1 / 3)
    return float((ratio - (1 - 2 / (9 * degrees))) / math.sqrt(2 / (9 * degrees)))


@dataclass(frozen=True, slots=True)
class _Arrays:
    mean: Floats
    scale: Floats
    precision: Floats


def profile_arrays(profile: manifest_pb2.DomainProfile) -> _Arrays:
    size = len(profile.features)
    return _Arrays(
        np.asarray(profile.mean),
        np.asarray(profile.scale),
        np.asarray(profile.precision).reshape(size, size),
    )


def _distance(arrays: _Arrays, features: Floats) -> float:
    standard = (features - arrays.mean) / arrays.scale
    return float(math.sqrt(max(0.0, float(standard @ arrays.precision @ standard))))


class DomainScorer:
    """Scores frames against one model's profile (built once per loaded model); ``drift_threshold`` is the
    streams' drift test's (``drift``) for ``drift_false_alarm_frames`` (0 where the profile has no fit for it)."""

    def __init__(
        self,
        manifest: manifest_pb2.ModelManifest,
        drift_false_alarm_frames: float = false_alarm_frames(DEFAULT_FALSE_ALARM_HOURS),
    ) -> None:
        self.manifest = manifest
        self.profile = manifest.domain
        self._arrays = profile_arrays(self.profile)
        fitted = self.profile.score_spread > 0 and self.profile.score_degrees > 0
        self.drift_threshold = cusum_threshold(drift_false_alarm_frames) if fitted else 0.0

    def score(self, tensor: npt.NDArray[np.float32], outputs: Outputs) -> tuple[float, list[str]]:
        """The frame's distance from the reference, and its furthest features."""
        features = frame_features(tensor, outputs, self.manifest)
        standard = np.abs((features - self._arrays.mean) / self._arrays.scale)
        furthest = [self.profile.features[i] for i in np.argsort(-standard)[:FURTHEST]]
        return _distance(self._arrays, features), furthest
