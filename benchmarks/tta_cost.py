"""What flip test-time augmentation costs against one pass, on the example model, in one run.

The example lesion U-Net (exported here unless ``--bundle`` names a bundle)
runs on synthetic ultrasound frames through ONNX Runtime as the server opens
it (``OnnxRuntimeBackend``), alternately: one pass (the frame, batch 1) and
flip (the frame and its mirror image as one inference of batch 2, the two
outputs merged, ``runtime.pipeline.tta``). Timed per frame: the inference
alone, and the model's whole part of the frame (preprocess, inference, merge,
postprocess with the confidence). Prints p50/p99 of each and their ratios,
and writes ``benchmarks/results/tta_cost.json``.
Run: ``.venv/bin/python benchmarks/tta_cost.py [--bundle DIR] [--frames N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import export_example

from edgescope.bundle import Bundle, load_bundle
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.pipeline.postprocess import postprocess
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.pipeline.tta import flip_batch, merge_flip
from edgescope.runtime.sources import open_source

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "tta_cost.json"
TARGET = 1.6


def _percentiles(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) / 1e6
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def measure(bundle: Bundle, frames: int) -> dict[str, Any]:
    manifest = bundle.manifest
    name = manifest.inputs[0].name
    with open_source("synthetic:ultrasound?seed=11") as source:
        pixels = [frame.pixels for _, frame in zip(range(16), source, strict=False)]
    times: dict[str, list[float]] = {"one_infer": [], "flip_infer": [], "one_total": [], "flip_total": []}
    with OnnxRuntimeBackend().load(bundle) as session:
        for warm in range(5):
            tensor, _ = preprocess(pixels[warm], manifest.preprocessing)
            session.infer({name: tensor})
            session.infer({name: flip_batch(tensor, manifest.preprocessing.layout)})
        for index in range(frames):
            frame = pixels[index % len(pixels)]
            # Alternating which goes first, so neither gets the warmer cache or the quieter moment.
            for mode in ("one", "flip") if index % 2 == 0 else ("flip", "one"):
                start = time.perf_counter_ns()
                tensor, geometry = preprocess(frame, manifest.preprocessing)
                feed = tensor if mode == "one" else flip_batch(tensor, manifest.preprocessing.layout)
                begin = time.perf_counter_ns()
                outputs = session.infer({name: feed})
                inferred = time.perf_counter_ns()
                if mode == "flip":
                    outputs = merge_flip(outputs, manifest)
                postprocess(outputs, manifest, geometry, None, [])
                end = time.perf_counter_ns()
                times[f"{mode}_infer"].append(inferred - begin)
                times[f"{mode}_total"].append(end - start)
    stats = {key: _percentiles(value) for key, value in times.items()}
    return {
        "frames": frames,
        **stats,
        "ratio_infer_p50": stats["flip_infer"]["p50_ms"] / stats["one_infer"]["p50_ms"],
        "ratio_total_p50": stats["flip_total"]["p50_ms"] / stats["one_total"]["p50_ms"],
        "target_ratio": TARGET,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle of the example model (default: export one here)")
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(args.bundle) if args.bundle else export_example(Path(tmp))
        report = measure(bundle, args.frames)
    for mode in ("one", "flip"):
        infer, total = report[f"{mode}_infer"], report[f"{mode}_total"]
        print(
            f"{'one pass' if mode == 'one' else 'flip TTA':<9} inference p50 {infer['p50_ms']:7.2f} ms "
            f"p99 {infer['p99_ms']:7.2f} ms; model's part of the frame p50 {total['p50_ms']:7.2f} ms "
            f"p99 {total['p99_ms']:7.2f} ms"
        )
    verdict = "met" if report["ratio_total_p50"] <= TARGET else "not met"
    print(
        f"flip / one pass: inference {report['ratio_infer_p50']:.2f}x, "
        f"model's part {report['ratio_total_p50']:.2f}x (target <= {TARGET}x: {verdict})"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
