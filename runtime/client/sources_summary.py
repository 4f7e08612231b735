"""What a stream of several sources saw: each source's frames and answers, and how sets were paired.

The summary's ``pairing`` and ``sources`` sections::

    {"pairing": {"pairs": N, "skew_ms": {"p50": .., "p99": .., "max": ..}, "unpaired": {"white": n, "nir": n},
                 "tolerance_ms": .., "clock": "source"},
     "sources": {"white": {"sent": .., "results": .., "paired": .., "dropped": .., "fps": ..}, "nir": {...}}}

``results`` counts the frames whose answer is a model's result (the sets'
leading frames), ``paired`` those taken into another frame's set; skew is a
partner's capture time minus its leading frame's, in absolute value. The
clock is the sources' own: each frame's timestamp from the stream's start.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgescope.v1 import stream_pb2

OK = stream_pb2.FRAME_STATUS_CODE_OK
PAIRED = stream_pb2.FRAME_STATUS_CODE_PAIRED
DROPPED = stream_pb2.FRAME_STATUS_CODE_DROPPED


class SourcesSummary:
    """Counts per source and pairing skews, from each frame sent and each answer."""

    def __init__(self, names: Sequence[str], clock: str) -> None:
        self._clock = clock
        self._counts = {name: {"sent": 0, "results": 0, "paired": 0, "dropped": 0, "errors": 0} for name in names}
        self._unpaired = dict.fromkeys(names, 0)
        self._skews_ms: list[float] = []
        self._tolerance_ms = 0.0
        self._first_ns: dict[str, int] = {}
        self._last_ns: dict[str, int] = {}

    def sent(self, frame: stream_pb2.Frame) -> None:
        self._counts[frame.source]["sent"] += 1
        self._first_ns.setdefault(frame.source, frame.capture_time_ns)
        self._last_ns[frame.source] = frame.capture_time_ns

    def answered(self, source: str, result: stream_pb2.Result) -> None:
        counts = self._counts[source]
        code = result.status.code
        if code == OK:
            counts["results"] += 1
            self._skews_ms.extend(abs(p.skew_ns) / 1e6 for p in result.pairing.partners)
            self._tolerance_ms = result.pairing.tolerance_ms or self._tolerance_ms
        elif code == PAIRED:
            counts["paired"] += 1
        elif code == DROPPED:
            counts["dropped"] += 1
            if result.status.drop_reason == stream_pb2.DROP_REASON_UNPAIRED:
                self._unpaired[source] += 1
        else:
            counts["errors"] += 1

    def as_dict(self) -> dict[str, object]:
        skews = np.asarray(self._skews_ms)
        sources: dict[str, object] = {}
        for name, counts in self._counts.items():
            span_s = (self._last_ns.get(name, 0) - self._first_ns.get(name, 0)) / 1e9
            fps = (counts["sent"] - 1) / span_s if span_s > 0 else 0.0
            sources[name] = {**counts, "fps": round(fps, 2)}
        return {
            "pairing": {
                "pairs": len(self._skews_ms) // max(1, len(self._counts) - 1),
                "skew_ms": {
                    "p50": round(float(np.percentile(skews, 50)), 3) if skews.size else None,
                    "p99": round(float(np.percentile(skews, 99)), 3) if skews.size else None,
                    "max": round(float(skews.max()), 3) if skews.size else None,
                },
                "unpaired": self._unpaired,
                "tolerance_ms": round(self._tolerance_ms, 3),
                "clock": self._clock,
            },
            "sources": sources,
        }

    def format_line(self) -> str:
        summary = self.as_dict()
        pairing = summary["pairing"]
        assert isinstance(pairing, dict)
        skew = pairing["skew_ms"]
        unpaired = ", ".join(f"{name} {count}" for name, count in pairing["unpaired"].items())
        return (
            f"pairing: {pairing['pairs']} sets, skew p50 {skew['p50']} ms p99 {skew['p99']} ms max {skew['max']} ms "
            f"(tolerance {pairing['tolerance_ms']} ms, {pairing['clock']} clock); unpaired: {unpaired}"
        )
