"""The gate's limits, and each precision's defaults.

A limit is either a **floor** that every frame must reach (the worst frame
decides: the elementwise tolerance, per-frame Dice, PSNR, SSIM, probability
and score differences) or an **aggregate** over the frames (mean Dice, top-1
agreement, box matching). The self-test on a handful of golden frames applies
the floors only against the reference, since a mean over a few frames says
little; see ``metrics.compare``.

Raw outputs are held to an absolute and a relative tolerance together, as
numpy's ``allclose`` and Polygraphy do: every element must satisfy
``|candidate - reference| <= atol + rtol * max(|reference|, mean |reference|)``
(``max_abs_error`` is the atol; the mean is over that output on that frame).
The floor on the relative term is because rounding near a zero crossing is
the size of the output's values, not of that element's own. An absolute limit
alone ignores the output's scale: it refused correct FP32 graphs whose logits
reach tens (MONAI's DynUNet with deep supervision: 2.4e-3 at most, 7.8e-5 on
average, Dice 0.9995), and would pass wrong ones whose outputs are small. The
FP32 defaults (atol 1e-3, rtol 1e-3) pass such a DynUNet (its logits scaled
to tens: 0.0095 at most, within 3 % of its tolerance) and refuse an op that
shifts the outputs by 1 % (8x its tolerance), both measured in the tests.

Limits given by the user are used as given, each one, even where it equals a
default (``gate_thresholds``); the rest are the precision's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

from edgescope.engines import PRECISION_NAMES
from edgescope.v1 import manifest_pb2

PRECISIONS: dict[str, manifest_pb2.Precision.ValueType] = {name: value for value, name in PRECISION_NAMES.items()}


@dataclass(frozen=True, slots=True)
class GateThresholds:
    """Per-metric limits; the defaults suit FP32 exports. Each task reads the ones it measures.

    The field names are those of the ``GateLimits`` message that carries them in a manifest.
    """

    # Elementwise: |candidate - reference| <= max_abs_error + rtol * |reference|.
    max_abs_error: float = 1e-3
    rtol: float = 1e-3
    # Segmentation: mean Dice over the frames, and the floor each frame must reach.
    min_dice: float = 0.99
    min_frame_dice: float = 0.99
    min_top1_agreement: float = 1.0
    max_probability_difference: float = 1e-3
    min_box_match: float = 1.0
    min_box_iou: float = 0.99
    min_psnr_db: float = 40.0
    min_ssim: float = 0.99
    max_score_difference: float = 1e-4

    def to_proto(self) -> manifest_pb2.GateLimits:
        return manifest_pb2.GateLimits(**asdict(self))

    @classmethod
    def from_proto(cls, limits: manifest_pb2.GateLimits) -> GateThresholds:
        return cls(**{f.name: float(getattr(limits, f.name)) for f in fields(cls)})


# The limits an FP32 export is held to are too tight for reduced precision.
# FP16 moves logits by about a tenth; INT8 moves a few saturated logits by
# several units (far from any decision threshold), so its raw error is
# reported without a limit and the task metrics (masks, classes, boxes,
# images: the clinical output) decide. Segmentation's per-frame floor is a
# Dice of 0.9 for both: below it a frame has lost or grown a structure, not
# moved a border pixel (one pixel of a 10-pixel lesion is already 0.95).
_RELAXED: dict[str, dict[str, float]] = {
    "fp16": {
        "max_abs_error": 0.5,
        "rtol": 1e-2,
        "min_dice": 0.98,
        "min_frame_dice": 0.9,
        "max_probability_difference": 0.01,
        "min_box_iou": 0.95,
        "min_psnr_db": 30.0,
        "min_ssim": 0.95,
        "max_score_difference": 0.01,
    },
    "int8": {
        "max_abs_error": float("inf"),
        "rtol": 0.0,
        "min_dice": 0.95,
        "min_frame_dice": 0.9,
        "min_top1_agreement": 0.95,
        "max_probability_difference": 0.1,
        "min_box_match": 0.9,
        "min_box_iou": 0.85,
        "min_psnr_db": 25.0,
        "min_ssim": 0.90,
        "max_score_difference": 0.1,
    },
}
_DEFAULTS = GateThresholds()
PRECISION_THRESHOLDS: dict[str, GateThresholds] = {
    "fp32": _DEFAULTS,
    **{precision: replace(_DEFAULTS, **limits) for precision, limits in _RELAXED.items()},
}

# Reduced precision shows its failures on a few frames in many (the example
# U-Net's INT8 graph loses small lesions on a quarter of its frames), so its
# gate runs on more frames by default.
PRECISION_SAMPLES: dict[str, int] = {"fp32": 16, "fp16": 48, "int8": 48}


def gate_thresholds(precision: str, given: Mapping[str, float]) -> GateThresholds:
    """``precision``'s defaults, with each limit the user ``given`` used as given (even at a default's value)."""
    names = {f.name for f in fields(GateThresholds)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"unknown gate limit(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return replace(PRECISION_THRESHOLDS[precision], **{name: float(value) for name, value in given.items()})
