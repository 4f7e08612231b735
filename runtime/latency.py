"""Latency summaries: percentiles per stage and end to end, fps, drops, errors."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50.0, 95.0, 99.0)


@dataclass(frozen=True, slots=True)
class StageStats:
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float


def stage_stats(values_ns: list[int]) -> StageStats:
    data = np.asarray(values_ns, dtype=np.float64) / 1e6
    p50, p95, p99 = np.percentile(data, PERCENTILES)
    return StageStats(len(values_ns), float(p50), float(p95), float(p99), float(data.max()), float(data.mean()))


@dataclass(slots=True)
class LatencyRecorder:
    """Collects durations per stage for one run and summarises them."""

    stages: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    results: int = 0
    dropped: int = 0
    errors: int = 0
    first_s: float | None = None
    last_s: float | None = None

    def add(self, stage: str, duration_ns: int) -> None:
        self.stages[stage].append(duration_ns)

    def mark(self, now_s: float) -> None:
        if self.first_s is None:
            self.first_s = now_s
        self.last_s = now_s

    @property
    def fps(self) -> float:
        if self.first_s is None or self.last_s is None or self.results < 2 or self.last_s <= self.first_s:
            return 0.0
        return (self.results - 1) / (self.last_s - self.first_s)

    def summary(self) -> dict[str, StageStats]:
        return {stage: stage_stats(values) for stage, values in self.stages.items() if values}

    def as_dict(self) -> dict[str, object]:
        return {
            "results": self.results,
            "dropped": self.dropped,
            "errors": self.errors,
            "fps": round(self.fps, 2),
            "stages_ms": {
                stage: {k: round(v, 3) if isinstance(v, float) else v for k, v in vars_of(stats).items()}
                for stage, stats in self.summary().items()
            },
        }

    def format_table(self) -> str:
        lines = [f"{'stage':<14}{'count':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}"]
        for stage, stats in self.summary().items():
            lines.append(
                f"{stage:<14}{stats.count:>7}{stats.p50_ms:>10.2f}{stats.p95_ms:>10.2f}{stats.p99_ms:>10.2f}{stats.max_ms:>10.2f}"
            )
        lines.append(f"results {self.results}  fps {self.fps:.1f}  dropped {self.dropped}  errors {self.errors}")
        return "\n".join(lines)


def vars_of(stats: StageStats) -> dict[str, float | int]:
    return {name: getattr(stats, name) for name in StageStats.__slots__}
