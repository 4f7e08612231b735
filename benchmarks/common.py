"""What several benchmarks share: where things are, latency percentiles, the example model's bundle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgescope.bundle import Bundle

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ultrasound_unet"
RESULTS = ROOT / "benchmarks" / "results"


def percentiles(values_ms: list[float]) -> dict[str, float]:
    data = np.asarray(values_ms)
    return {
        "p50_ms": round(float(np.percentile(data, 50)), 3),
        "p99_ms": round(float(np.percentile(data, 99)), 3),
        "max_ms": round(float(data.max()), 3),
    }


@dataclass
class Timed:
    """One mode's per-frame latencies (ms) and wall time, pooled over rounds."""

    times: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    # Frames run, where not every frame has a latency of its own (0: one per latency).
    frames: int = 0
    # The server's own stage timings of each answer (ms), where it reports them.
    stages: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        frames = self.frames or len(self.times)
        summary = {"frames": frames, "fps": round(frames / self.elapsed, 2), **percentiles(self.times)}
        if self.stages:
            summary["stages_p50_ms"] = {name: round(float(np.median(v)), 2) for name, v in self.stages.items()}
            inside = np.sum([values for values in self.stages.values()], axis=0)
            # Transport both ways, the client's encode and decode, and what the server does between stages.
            summary["outside_stages_p50_ms"] = round(float(np.median(np.asarray(self.times) - inside)), 2)
        return summary


def export_example(directory: Path, **fields: Any) -> Bundle:
    """The example lesion U-Net exported into ``directory``/lesion-unet, quietly."""
    from edgescope.export import ExportRequest, export_model

    return export_model(
        ExportRequest(
            name="lesion-unet",
            output=directory / "lesion-unet",
            factory=f"{EXAMPLE / 'model.py'}:build",
            weights=EXAMPLE / "weights.pt",
            **{"samples": 4, **fields},
        ),
        log=lambda _line: None,
    )
