"""FP32 vs FP16 vs INT8 of the example U-Net in ONNX Runtime on the CPU, in one run.

Exports the three bundles through the public API (INT8 calibrated on one
synthetic-ultrasound seed), then runs them and PyTorch on the same held-out
frames (another seed): Dice of each precision's masks against FP32's and
against PyTorch's, and the median single-frame latency of each ONNX Runtime
session (FP32 is the baseline).

Prints a table, writes ``benchmarks/results/precision.json`` and a PNG.
Run: ``.venv/bin/python benchmarks/precision.py [--frames N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from edgescope.export import ExportRequest, export_model
from edgescope.export.loading import load_model
from edgescope.export.precision import calibration_inputs
from edgescope.export.validation import dice
from edgescope.runtime.pipeline.postprocess import segmentation_mask

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ultrasound_unet"
RESULTS = ROOT / "benchmarks" / "results"
PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION = "synthetic:ultrasound?seed=101"
TEST = "synthetic:ultrasound?seed=202"


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=48, help="held-out frames scored")
    parser.add_argument("--runs", type=int, default=200, help="timed single-frame runs per precision")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgescope-precision-"))
    bundles = {}
    for precision in PRECISIONS:
        start = time.perf_counter()
        bundles[precision] = export_model(
            ExportRequest(
                name=f"lesion-unet-{precision}",
                output=work / precision,
                factory=str(EXAMPLE / "model.py") + ":build",
                weights=EXAMPLE / "weights.pt",
                precision=precision,
                calibration_data=CALIBRATION if precision == "int8" else None,
                calibration_samples=32,
                samples=8,
                engines=False,
            ),
            log=lambda _line: None,
        )
        print(f"exported {precision} in {time.perf_counter() - start:.1f} s")

    spec = bundles["fp32"].manifest.preprocessing
    params = bundles["fp32"].manifest.postprocessing.segmentation
    frames = calibration_inputs(TEST, args.frames, spec)
    model = load_model(str(EXAMPLE / "model.py") + ":build", EXAMPLE / "weights.pt", None)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        torch_masks = [segmentation_mask(model(torch.from_numpy(x)).numpy(), params) for x in frames]

    results: dict[str, dict[str, Any]] = {}
    masks: dict[str, list[np.ndarray]] = {}
    for precision, bundle in bundles.items():
        session = _session(bundle.onnx_path, args.threads)
        outputs = [session.run(None, {"image": x})[0] for x in frames]
        masks[precision] = [segmentation_mask(o, params) for o in outputs]
        for _ in range(10):
            session.run(None, {"image": frames[0]})
        times = []
        for i in range(args.runs):
            x = frames[i % len(frames)]
            start = time.perf_counter()
            session.run(None, {"image": x})
            times.append((time.perf_counter() - start) * 1000.0)
        vs_torch = [dice(a, b) for a, b in zip(masks[precision], torch_masks, strict=True)]
        results[precision] = {
            "model_bytes": bundle.onnx_path.stat().st_size,
            "dice_vs_pytorch_mean": float(np.mean(vs_torch)),
            "dice_vs_pytorch_min": float(np.min(vs_torch)),
            "latency_ms_p50": float(np.median(times)),
            "latency_ms_p95": float(np.percentile(times, 95)),
        }
    for precision in PRECISIONS:
        vs_fp32 = [dice(a, b) for a, b in zip(masks[precision], masks["fp32"], strict=True)]
        results[precision]["dice_vs_fp32_mean"] = float(np.mean(vs_fp32))
        results[precision]["dice_vs_fp32_min"] = float(np.min(vs_fp32))
        results[precision]["latency_vs_fp32"] = results[precision]["latency_ms_p50"] / results["fp32"]["latency_ms_p50"]

    print(
        f"\n{'precision':<10}{'Dice vs FP32 mean/min':>24}{'Dice vs PyTorch mean/min':>27}"
        f"{'p50 ms':>9}{'vs FP32':>9}{'size KB':>9}"
    )
    for precision, r in results.items():
        print(
            f"{precision:<10}{r['dice_vs_fp32_mean']:>15.4f} / {r['dice_vs_fp32_min']:.4f}"
            f"{r['dice_vs_pytorch_mean']:>18.4f} / {r['dice_vs_pytorch_min']:.4f}"
            f"{r['latency_ms_p50']:>9.2f}{r['latency_vs_fp32']:>8.2f}x{r['model_bytes'] / 1024:>9.0f}"
        )
    summary = {
        "what": "example lesion U-Net, ONNX Runtime CPU, batch 1, 256x256",
        "frames": args.frames,
        "test_source": TEST,
        "calibration_source": CALIBRATION,
        "runs": args.runs,
        "threads": args.threads,
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "precision.json"
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(results)
    left.bar(names, [results[n]["latency_ms_p50"] for n in names], color=["#4c72b0", "#55a868", "#c44e52"])
    left.set_ylabel("median latency per frame (ms)")
    left.set_title(f"ONNX Runtime CPU, {args.threads} threads")
    right.bar(names, [results[n]["dice_vs_fp32_mean"] for n in names], color=["#4c72b0", "#55a868", "#c44e52"])
    right.set_ylim(max(0.0, min(results[n]["dice_vs_fp32_mean"] for n in names) - 0.05), 1.0)
    right.set_ylabel("mean Dice vs FP32 masks")
    right.set_title(f"{args.frames} held-out simulated frames")
    figure.tight_layout()
    figure.savefig(RESULTS / "precision.png", dpi=120)
    print(f"wrote {RESULTS / 'precision.png'}")


if __name__ == "__main__":
    main()
