"""Which answered frames of a stream become key images in the archive (``--key-frames``, ``--max-key-frames``).

- ``every:SECONDS``: the first answered frame, then the first answered frame
  at least SECONDS of stream time after the last one kept;
- ``on-alert``: a frame whose result carries an alert the result before it did
  not (out of domain, latency budget, ...): a condition that lasts is kept
  once, at its start, not on every frame while it lasts;
- both, comma-separated (``every:10,on-alert``).

At most ``max_frames`` are kept (memory and the archive are bounded); frames
chosen after that are counted, not kept. Only answered frames (status OK)
are eligible: a key image goes with the model's result on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgescope.errors import ConfigError
from edgescope.runtime.sources.base import SourceFrame
from edgescope.v1 import stream_pb2

DEFAULT_POLICY = "every:10"
DEFAULT_MAX_FRAMES = 100


@dataclass(frozen=True, slots=True)
class KeyFramePolicy:
    every_s: float | None
    on_alert: bool
    max_frames: int = DEFAULT_MAX_FRAMES

    def __str__(self) -> str:
        rules = ([f"every:{self.every_s:g}"] if self.every_s is not None else []) + (
            ["on-alert"] if self.on_alert else []
        )
        return ",".join(rules)


def parse_key_frames(text: str, max_frames: int = DEFAULT_MAX_FRAMES) -> KeyFramePolicy:
    """``every:SECONDS``, ``on-alert`` or both, comma-separated; raises ConfigError saying what is wrong."""
    if max_frames < 1:
        raise ConfigError(f"--max-key-frames must be at least 1, got {max_frames}")
    every_s: float | None = None
    on_alert = False
    for rule in (part.strip() for part in text.split(",")):
        name, _, value = rule.partition(":")
        if name == "on-alert" and not value:
            on_alert = True
        elif name == "every":
            try:
                every_s = float(value)
            except ValueError:
                every_s = math.nan
            if not (math.isfinite(every_s) and every_s > 0):
                raise ConfigError(f"--key-frames {rule!r}: every:SECONDS needs a positive number of seconds")
        else:
            raise ConfigError(f"--key-frames {rule!r}: use every:SECONDS, on-alert, or both (every:10,on-alert)")
    return KeyFramePolicy(every_s, on_alert, max_frames)


@dataclass(slots=True)
class KeyFrameChooser:
    """Applies a policy to results as they arrive; ``choose`` says why a frame is a key frame, or None."""

    policy: KeyFramePolicy
    kept: int = 0
    over_limit: int = 0
    # Stream time of the last frame chosen by every:SECONDS (an alert's frame does not move it).
    _last_kept_s: float | None = None
    _alerts: frozenset[int] = field(default_factory=frozenset)

    def choose(self, frame: SourceFrame, result: stream_pb2.Result) -> str | None:
        if result.status.code != stream_pb2.FRAME_STATUS_CODE_OK:
            return None
        reasons = []
        alerts = frozenset(alert.kind for alert in result.alerts)
        started, self._alerts = alerts - self._alerts, alerts
        if self.policy.on_alert and started:
            names = sorted(stream_pb2.Alert.Kind.Name(kind).removeprefix("KIND_").lower() for kind in started)
            reasons.append(f"alert: {', '.join(names)}")
        last = self._last_kept_s
        # A looping source starts its clock again: its first frame counts as due.
        due = last is None or frame.timestamp_s < last or frame.timestamp_s - last >= (self.policy.every_s or 0.0)
        periodic = self.policy.every_s is not None and due
        if periodic:
            reasons.append(f"every {self.policy.every_s:g} s")
        if not reasons:
            return None
        if periodic:
            self._last_kept_s = frame.timestamp_s
        if self.kept >= self.policy.max_frames:
            self.over_limit += 1
            return None
        self.kept += 1
        return "; ".join(reasons)
