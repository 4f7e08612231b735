"""Latency statistics on HDR histograms: percentiles per stage, jitter, fps, drops.

Durations go into HdrHistogram (the ``hdrhistogram`` package) in microseconds,
1 µs to 60 s at 2 significant digits: recording is constant-time, memory is
fixed (about 20 kB per histogram) however long a stream runs, and every
percentile is within 1% of the exact value. Longer durations are clamped to
60 s and still counted.

Used by the server's telemetry and by the client's latency summary.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

from edgescope.v1 import stream_pb2

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
HIGHEST_US = 60_000_000
SIGNIFICANT_DIGITS = 2
# Window over which the live frame rate is measured.
FPS_WINDOW_S = 2.0


@dataclass(frozen=True, slots=True)
class StageStats:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    jitter_ms: float


class StageHistogram:
    """One stage's durations; jitter is the mean absolute change between consecutive frames."""

    __slots__ = ("_cached", "_hist", "_jitter_n", "_jitter_sum_us", "_last_us", "_sum_us")

    def __init__(self) -> None:
        self._hist = HdrHistogram(1, HIGHEST_US, SIGNIFICANT_DIGITS)
        self._last_us = -1
        self._jitter_sum_us = 0
        self._jitter_n = 0
        # Kept here because hdrh computes the mean by walking every bucket in Python.
        self._sum_us = 0
        self._cached: StageStats | None = None

    def record(self, duration_ns: int) -> None:
        us = min(max(duration_ns // 1000, 0), HIGHEST_US)
        self._hist.record_value(us)
        self._sum_us += us
        if self._last_us >= 0:
            self._jitter_sum_us += abs(us - self._last_us)
            self._jitter_n += 1
        self._last_us = us

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def stats(self) -> StageStats:
        """Percentiles walk the buckets: computed once per change, then reused (snapshots are periodic)."""
        count = self.count
        if self._cached is not None and self._cached.count == count:
            return self._cached
        values = self._hist.get_percentile_to_value_dict(list(PERCENTILES))
        p50, p90, p99, p999 = (values[p] / 1000.0 for p in PERCENTILES)
        jitter = self._jitter_sum_us / self._jitter_n / 1000.0 if self._jitter_n else 0.0
        self._cached = StageStats(
            count=count,
            p50_ms=p50,
            p90_ms=p90,
            p99_ms=p99,
            p999_ms=p999,
            max_ms=self._hist.get_max_value() / 1000.0,
            mean_ms=self._sum_us / count / 1000.0 if count else 0.0,
            jitter_ms=jitter,
        )
        return self._cached


class LatencyRecorder:
    """Durations per stage and answer counts for one run, one stream or one model.

    The first ``warmup`` answers are counted but their durations are left out,
    so one-off costs (allocator, caches, lazy initialisation) do not set p99.9.
    """

    def __init__(self, warmup: int = 0) -> None:
        self.warmup = warmup
        self.stages: dict[str, StageHistogram] = {}
        self.results = 0
        self.dropped = 0
        self.errors = 0
        self.deadline_misses = 0
        # Answered frames whose input did not look like what the model was validated on.
        self.out_of_domain_frames = 0
        # DRIFT alerts: each starts an episode of the stream drifting away from the model's domain.
        self.drift_alerts = 0
        # Answered frames whose quantities the model's policy withheld (Result.withheld).
        self.withheld_frames = 0
        self.warmup_frames = 0
        self.drops: Counter[str] = Counter()
        # Streams of several sources: each partner's |capture skew| from its set's leading frame, and
        # the frames answered unpaired by source.
        self.pairing_skew = StageHistogram()
        self.unpaired: Counter[str] = Counter()
        self.first_s: float | None = None
        self.last_s: float | None = None
        self._recent: deque[float] = deque(maxlen=256)

    def count_result(self, now_s: float) -> bool:
        """Count one answer; False while it is a warm-up frame whose durations are left out."""
        self.results += 1
        self.mark(now_s)
        if self.results <= self.warmup:
            self.warmup_frames += 1
            return False
        return True

    def count_drop(self, reason: str) -> None:
        self.dropped += 1
        self.drops[reason] += 1

    def add(self, stage: str, duration_ns: int) -> None:
        histogram = self.stages.get(stage)
        if histogram is None:
            histogram = self.stages[stage] = StageHistogram()
        histogram.record(duration_ns)

    def mark(self, now_s: float) -> None:
        if self.first_s is None:
            self.first_s = now_s
        self.last_s = now_s
        self._recent.append(now_s)

    @property
    def fps(self) -> float:
        """Answers per second over the whole run."""
        if self.first_s is None or self.last_s is None or self.results < 2 or self.last_s <= self.first_s:
            return 0.0
        return (self.results - 1) / (self.last_s - self.first_s)

    def recent_fps(self, now_s: float | None = None) -> float:
        """Answers per second over the last ``FPS_WINDOW_S`` (0 once answers stop)."""
        now = time.monotonic() if now_s is None else now_s
        times = [t for t in self._recent if now - t <= FPS_WINDOW_S]
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def summary(self) -> dict[str, StageStats]:
        return {stage: histogram.stats() for stage, histogram in self.stages.items() if histogram.count}

    def as_dict(self) -> dict[str, object]:
        return {
            "results": self.results,
            "dropped": self.dropped,
            "drops": dict(self.drops),
            "errors": self.errors,
            "deadline_misses": self.deadline_misses,
            "out_of_domain_frames": self.out_of_domain_frames,
            "drift_alerts": self.drift_alerts,
            "withheld_frames": self.withheld_frames,
            "warmup_frames": self.warmup_frames,
            "fps": round(self.fps, 2),
            "stages_ms": {
                stage: {k: round(v, 3) if isinstance(v, float) else v for k, v in vars_of(stats).items()}
                for stage, stats in self.summary().items()
            },
        }

    def format_table(self) -> str:
        header = ("stage", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "jitter ms")
        lines = [f"{header[0]:<14}{header[1]:>7}" + "".join(f"{h:>10}" for h in header[2:])]
        for stage, s in self.summary().items():
            values = (s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms, s.jitter_ms)
            lines.append(f"{stage:<14}{s.count:>7}" + "".join(f"{v:>10.2f}" for v in values))
        drops = ", ".join(f"{reason} {n}" for reason, n in self.drops.items())
        lines.append(
            f"results {self.results}  fps {self.fps:.1f}  dropped {self.dropped}"
            + (f" ({drops})" if drops else "")
            + f"  deadline misses {self.deadline_misses}  errors {self.errors}"
            + (f"  out of domain {self.out_of_domain_frames}" if self.out_of_domain_frames else "")
            + (f"  drift alerts {self.drift_alerts}" if self.drift_alerts else "")
            + (f"  withheld {self.withheld_frames}" if self.withheld_frames else "")
            + (f"  warm-up excluded {self.warmup_frames}" if self.warmup_frames else "")
        )
        return "\n".join(lines)


def reason_code(reason: str) -> str:
    """A short label for a drop reason: the words before the first ':' ("deadline: 41 ms late" -> "deadline")."""
    head = reason.partition(":")[0].strip().lower()
    code = "".join(c if c.isalnum() else "_" for c in head)[:32].strip("_")
    return code or "unspecified"


def count_monitoring(latency: LatencyRecorder, result: stream_pb2.Result) -> None:
    """Count what the input monitoring said of one answer: out of domain, drift alerts, withheld."""
    if result.domain.checked and not result.domain.in_domain:
        latency.out_of_domain_frames += 1
    latency.drift_alerts += sum(1 for alert in result.alerts if alert.kind == stream_pb2.Alert.KIND_DRIFT)
    if result.withheld:
        latency.withheld_frames += 1


def drop_label(status: stream_pb2.FrameStatus) -> str:
    """The drop reason of a DROPPED status as a label: "stale", "deadline", "shutdown"."""
    if status.drop_reason != stream_pb2.DROP_REASON_UNSPECIFIED:
        return stream_pb2.DropReason.Name(status.drop_reason).removeprefix("DROP_REASON_").lower()
    return reason_code(status.reason)


def missed_deadline(status: stream_pb2.FrameStatus) -> bool:
    """Dropped for its deadline, or processed late although it missed it."""
    return status.late or status.drop_reason == stream_pb2.DROP_REASON_DEADLINE


def vars_of(stats: StageStats) -> dict[str, float | int]:
    return {name: getattr(stats, name) for name in StageStats.__slots__}
