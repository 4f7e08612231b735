"""Pairing two sources by capture time: skew, frames left without an answer, cost per set.

Two parts, both printed and saved to ``benchmarks/results/pairing.json``:

1. **The pairer alone** (``edgescope.runtime.server.pairing``), on ten
   minutes of stream time: a 30 fps source leading a 25 fps one whose clock
   starts 7 ms later, each frame's capture time jittered by 1 ms (s.d.). The
   same frames paired by count (the i-th with the i-th, as a pipeline that
   pairs by message count does) are the baseline. Figures: sets, skew p50 /
   p99 / max, unpaired frames per source, and the pairer's cost per frame and
   per set (wall time of ``add`` over the run).
2. **A real server**: the example fusion model (``examples/fluorescence_fusion``)
   exported and served on loopback, ``synthetic:endoscopy`` at 30 fps and
   ``synthetic:fluorescence`` at 25 fps (both 960x540) streamed to it for ``--seconds`` at
   their own rates, as ``edgescope stream --source white=... --source nir=...``
   does. Figures: the client's summary (sets, skew, unpaired, per-source
   counts), frames without an answer, and end-to-end latency of the sets.

Targets: p99 skew <= half the faster source's period (16.7 ms); 0 frames
without an answer; <= 0.5 ms per set. Run: ``.venv/bin/python benchmarks/pairing.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgescope.runtime.server.pairing import Pairer, PairingSettings
from edgescope.v1 import stream_pb2

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "examples" / "fluorescence_fusion"
LEAD_FPS, PARTNER_FPS, OFFSET_MS, JITTER_MS = 30.0, 25.0, 7.0, 1.0
TARGET_SKEW_MS = 1000 / max(LEAD_FPS, PARTNER_FPS) / 2
# The served run's frames: qHD, so that 55 raw frames a second fit the 2-core reference machine's
# transport and preprocessing (1080p RGB is 6 MB a frame).
SIZE = "height=540&width=960"


@dataclass
class Item:
    frame: stream_pb2.Frame
    received_wall_ns: int = 0


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    array = np.abs(np.asarray(values))
    return {
        k: round(float(v), 3)
        for k, v in (("p50", np.percentile(array, 50)), ("p99", np.percentile(array, 99)), ("max", array.max()))
    }


def timeline(seconds: float, seed: int = 0) -> list[Item]:
    rng = np.random.default_rng(seed)
    stamps = [(k / LEAD_FPS, "white") for k in range(int(seconds * LEAD_FPS))]
    stamps += [(OFFSET_MS / 1e3 + k / PARTNER_FPS, "nir") for k in range(int(seconds * PARTNER_FPS))]
    jittered = [(t + rng.normal(0, JITTER_MS / 1e3), source) for t, source in stamps]
    jittered.sort()
    return [
        Item(stream_pb2.Frame(seq=seq, source=source, capture_time_ns=int(1e18 + t * 1e9)))
        for seq, (t, source) in enumerate(jittered)
    ]


def pairer_alone(seconds: float) -> dict[str, object]:
    items = timeline(seconds)
    skews_ms: list[float] = []
    answered: dict[int, str] = {}

    def answer(item: Item, what: str) -> None:
        assert item.frame.seq not in answered, "a frame answered twice"
        answered[item.frame.seq] = what

    def on_set(lead: Item, partners: dict[str, Item]) -> None:
        skews_ms.extend((p.frame.capture_time_ns - lead.frame.capture_time_ns) / 1e6 for p in partners.values())
        answer(lead, "set")

    async def run() -> tuple[Pairer[Item], float]:
        pairer: Pairer[Item] = Pairer(
            "white",
            ["nir"],
            PairingSettings(),
            on_set,
            lambda p, _lead: answer(p, "paired"),
            lambda i: answer(i, "unpaired"),
        )
        start = time.perf_counter()
        for item in items:
            pairer.add(item)
        spent = time.perf_counter() - start
        pairer.close()
        return pairer, spent

    pairer, spent_s = asyncio.run(run())
    leads = [i for i in items if i.frame.source == "white"]
    partners = [i for i in items if i.frame.source == "nir"]
    by_count = [
        (p.frame.capture_time_ns - lead.frame.capture_time_ns) / 1e6 for lead, p in zip(leads, partners, strict=False)
    ]
    sets = pairer.stats.sets
    return {
        "frames": len(items),
        "sets": sets,
        "unanswered": len(items) - len(answered),
        "unpaired": pairer.stats.unpaired,
        "tolerance_ms": round(pairer.tolerance_ms(), 3),
        "skew_ms": _stats(skews_ms),
        "baseline_by_count_skew_ms": _stats(by_count),
        "cost_us_per_frame": round(spent_s / len(items) * 1e6, 2),
        "cost_us_per_set": round(spent_s / max(1, sets) * 1e6, 2),
    }


def served(seconds: float) -> dict[str, object]:
    from edgescope.export import ExportRequest, export_model
    from edgescope.export.sources import SourceInput
    from edgescope.runtime.client.demo import start_server, stop_server
    from edgescope.runtime.client.stream import StreamOptions, stream_source
    from edgescope.runtime.sources import open_source
    from edgescope.runtime.sources.merged import MergedSources

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "fluorescence-fusion"
        export_model(
            ExportRequest(
                name="fluorescence-fusion",
                output=bundle,
                factory=f"{EXAMPLE / 'model.py'}:build",
                weights=EXAMPLE / "weights.pt",
                input_name="white",
                input_height=256,
                input_width=256,
                color="rgb",
                data="synthetic:endoscopy",
                frame_source="white",
                source_inputs=[SourceInput.parse("nir:128x128:gray=synthetic:fluorescence")],
                labels=["background", "perfused"],
                samples=8,
            ),
            log=lambda _line: None,
        )
        process, target = start_server([bundle], Path(tmp) / "port")
        try:
            sources = MergedSources(
                {
                    "white": open_source(f"synthetic:endoscopy?fps={LEAD_FPS:g}&{SIZE}"),
                    "nir": open_source(f"synthetic:fluorescence?fps={PARTNER_FPS:g}&{SIZE}"),
                }
            )
            frames = int(seconds * (LEAD_FPS + PARTNER_FPS))
            options = StreamOptions(
                target=target,
                model="fluorescence-fusion",
                max_frames=frames,
                policy=stream_pb2.STREAM_POLICY_EVERY,
                pairing=stream_pb2.PairingPolicy(mode=stream_pb2.PairingPolicy.MODE_WAIT),
            )
            with sources:
                report = asyncio.run(stream_source(sources, options))
        finally:
            stop_server(process)
    assert report.sources is not None
    summary = report.sources.as_dict()
    answered = sum(
        int(counts["results"] + counts["paired"] + counts["dropped"] + counts["errors"])  # type: ignore[index]
        for counts in summary["sources"].values()  # type: ignore[attr-defined]
    )
    end_to_end = report.latency.summary().get("end_to_end")
    return {
        "seconds": seconds,
        "sent": report.sent,
        "unanswered": report.sent - answered,
        **summary,
        "end_to_end_ms": {"p50": round(end_to_end.p50_ms, 2), "p99": round(end_to_end.p99_ms, 2)}
        if end_to_end
        else None,
        "error": report.error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="stream time of the served run")
    parser.add_argument("--skip-server", action="store_true", help="the pairer alone")
    args = parser.parse_args()
    results: dict[str, object] = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "sources": {"lead_fps": LEAD_FPS, "partner_fps": PARTNER_FPS, "offset_ms": OFFSET_MS, "jitter_ms": JITTER_MS},
        "target_skew_p99_ms": round(TARGET_SKEW_MS, 3),
    }
    alone = pairer_alone(600.0)
    results["pairer"] = alone
    print(json.dumps({"pairer": alone}, indent=2))
    if not args.skip_server:
        results["server"] = served(args.seconds)
        print(json.dumps({"server": results["server"]}, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pairing.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS / 'pairing.json'}")


if __name__ == "__main__":
    main()
