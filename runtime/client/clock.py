"""The server's clock offset, estimated NTP-style, to split end to end into uplink and downlink.

End-to-end latency on the client is measured on the client's own clock (the
capture stamp it put in the frame, echoed back, and the time the result
arrived), so it needs no clock synchronisation. Splitting it into uplink and
downlink does: ``ClockEstimator`` estimates the server's clock offset from the
receive/send stamps the server puts in each result.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClockSample:
    """NTP's four timestamps: client send, server receive, server send, client receive (ns)."""

    t0: int
    t1: int
    t2: int
    t3: int

    @property
    def delay_ns(self) -> int:
        """Round trip minus the server's residence: exact whatever the clocks' offset."""
        return (self.t3 - self.t0) - (self.t2 - self.t1)

    @property
    def offset_ns(self) -> float:
        """Server clock minus client clock, assuming a symmetric path."""
        return ((self.t1 - self.t0) + (self.t2 - self.t3)) / 2.0


class ClockEstimator:
    """Server clock offset from the lowest-delay sample of the last ``window``, as NTP's clock filter does.

    The sample that spent least time on the network has the least room for
    asymmetric queueing, so its offset is the most trustworthy.
    """

    def __init__(self, window: int = 8) -> None:
        self._samples: deque[ClockSample] = deque(maxlen=window)
        self.count = 0

    def add(self, sample: ClockSample) -> None:
        if sample.t1 <= 0 or sample.t2 < sample.t1:
            return
        self._samples.append(sample)
        self.count += 1

    @property
    def best(self) -> ClockSample | None:
        return min(self._samples, key=lambda s: s.delay_ns) if self._samples else None

    def split(self, sample: ClockSample) -> tuple[int, int] | None:
        """(uplink, downlink) in ns for ``sample``, using the current offset estimate."""
        best = self.best
        if best is None:
            return None
        offset = best.offset_ns
        return max(0, round(sample.t1 - sample.t0 - offset)), max(0, round(sample.t3 - sample.t2 + offset))

    def as_dict(self) -> dict[str, float | int]:
        best = self.best
        if best is None:
            return {"samples": 0}
        return {
            "samples": self.count,
            "offset_ms": round(best.offset_ns / 1e6, 3),
            "min_network_delay_ms": round(best.delay_ns / 1e6, 3),
        }
