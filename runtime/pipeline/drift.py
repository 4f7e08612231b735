"""Has a stream moved away from what the model was validated on? A CUSUM over its frames' domain scores.

The per-frame check (``domain``) answers for one frame at a false-alarm rate
of about 1 in 1,000; a shift too small to put single frames over its
threshold, or a run of frames each just under it, shows only over time. Each
frame's distance is mapped to a standard normal scale by the profile's fit of
in-domain distances (``domain.normal_score``: in-domain frames have mean 0,
deviation 1), and a one-sided CUSUM adds those values up per stream and
model:

    S = min(max(0, S + min(z, CLIP) - REFERENCE), 2 * h)

The stream is drifting when S passes ``h``; it alerts once, and again only
after S has come back to 0 (the stream back in domain for a while). ``h`` is
set for an expected number of in-domain frames between false alarms
(Siegmund's approximation of the CUSUM's average run length, frames taken
as independent). Each frame's contribution is capped at ``CLIP``, so one
outlying frame (the per-frame check flags it already) cannot trip the test
alone: it takes at least ``h / (CLIP - REFERENCE)`` frames. Consecutive
video frames are not independent, so the real false-alarm interval is
shorter than the one asked for; how much shorter is measured, not assumed
(``benchmarks/domain_check.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgescope.v1 import stream_pb2


class AuditLog(Protocol):
    """Where a drift episode is recorded: the server's audit trail (``archive.audit.AuditTrail``), which sits
    above the pipeline and so is named here by what it does."""

    def append(self, event: str, **fields: Any) -> dict[str, Any]: ...


DEFAULT_FALSE_ALARM_HOURS = 24.0
# The frame rate the false-alarm interval is counted at: a faster stream reaches it sooner.
FRAME_RATE = 30.0
# The shift (in deviations of the normal score) the test is tuned to find soonest, halved.
REFERENCE = 0.5
CLIP = 4.0


def false_alarm_frames(hours: float) -> float:
    return hours * 3600.0 * FRAME_RATE


def cusum_threshold(frames: float) -> float:
    """The ``h`` whose average run length between false alarms is ``frames`` (Siegmund's approximation)."""
    if frames <= 1:
        return 0.0

    def run_length(h: float) -> float:
        a = 2 * REFERENCE * (h + 1.166)
        return (math.exp(a) - a - 1) / (2 * REFERENCE**2)

    low, high = 0.0, 1000.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if run_length(middle) < frames else (low, middle)
    return high


@dataclass(slots=True)
class DriftTest:
    """One stream's test for one model."""

    statistic: float = 0.0
    drifting: bool = False

    def update(self, z: float, threshold: float) -> bool:
        """Add one frame's normal score; True when this frame starts a drift episode."""
        self.statistic = min(max(0.0, self.statistic + min(z, CLIP) - REFERENCE), 2 * threshold)
        if self.drifting and self.statistic == 0.0:
            self.drifting = False
        elif not self.drifting and self.statistic > threshold:
            self.drifting = True
            return True
        return False


@dataclass(slots=True)
class StreamDrift:
    """The drift tests of one stream (a ``StreamRun``), by stream id and model; run on the event loop
    as answers leave, in order. A drift episode's start is recorded in the audit trail, when there is one."""

    lane: str
    audit: AuditLog | None = None
    tests: dict[tuple[str, str], DriftTest] = field(default_factory=dict)

    def observe(self, result: stream_pb2.Result) -> None:
        """Update the test with a result's domain check; the result that starts an episode carries a DRIFT alert."""
        domain = result.domain
        if not domain.checked or domain.drift_threshold <= 0:
            return
        model = result.provenance.model
        test = self.tests.setdefault((result.stream_id, model), DriftTest())
        started = test.update(domain.normal_score, domain.drift_threshold)
        domain.drift, domain.drifting = test.statistic, test.drifting
        if not started:
            return
        result.alerts.add(
            kind=stream_pb2.Alert.KIND_DRIFT,
            model=model,
            value=test.statistic,
            threshold=domain.drift_threshold,
            message="the stream's recent frames, taken together, have moved away from what the model was "
            "validated on (its domain profile)",
        )
        if self.audit is not None:
            # Stream ids are the caller's words and may name a patient: the lane and frame number say which.
            self.audit.append(
                "domain_drift",
                model=model,
                lane=self.lane,
                frame=result.seq,
                statistic=round(test.statistic, 3),
                threshold=round(domain.drift_threshold, 3),
            )
