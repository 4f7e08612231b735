"""FP32, FP16 and INT8 of the example U-Net on the CPU: accuracy as gated and as served, in one run.

Exports the bundles through the public API (INT8 calibrated on one
synthetic-ultrasound seed, with full-range and with 7-bit weights), then runs
them and PyTorch on the same held-out frames (another seed, whose lesions are
often a few pixels). Each INT8 graph runs twice: as fake-quant (float
arithmetic, how the gate and TensorRT see it, the same on every CPU) and
through ONNX Runtime's integer kernels on this CPU (how a default ONNX Runtime
session serves it; 7-bit weights, ``--reduce-range``, are for CPUs without
VNNI). For each run: Dice against PyTorch's masks (mean, worst frame, frames
below 0.9) and against FP32's, the median single-frame latency (FP32 is the
baseline; the machine may be shared, so latency is rough), and the verdict of
the golden-frame self-test here.

Prints a table, writes ``benchmarks/results/precision.json`` and a PNG.
Run: ``.venv/bin/python benchmarks/precision.py [--frames N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from google.protobuf import json_format

from edgescope.export import ExportRequest, export_model
from edgescope.export.loading import load_model
from edgescope.export.precision import calibration_inputs
from edgescope.runtime.evaluation import FAKE_QUANT, INTEGER, describe_machine, onnxruntime_runner, self_test
from edgescope.runtime.evaluation.machine import machine_summary
from edgescope.runtime.evaluation.metrics import dice
from edgescope.runtime.pipeline.postprocess import segmentation_mask
from edgescope.v1 import manifest_pb2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ultrasound_unet"
RESULTS = ROOT / "benchmarks" / "results"
# Bundle -> export precision; int8-rr is INT8 with 7-bit weights (--reduce-range) for CPUs without VNNI.
BUNDLES = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8-rr": "int8"}
CALIBRATION = "synthetic:ultrasound?seed=101"
TEST = "synthetic:ultrasound?seed=202"
FLOOR = 0.9
# (name, bundle precision, how a Q/DQ graph runs)
RUNS = (
    ("fp32", "fp32", manifest_pb2.QUANT_EXECUTION_NONE),
    ("fp16", "fp16", manifest_pb2.QUANT_EXECUTION_NONE),
    ("int8 fake-quant", "int8", FAKE_QUANT),
    ("int8 integer kernels", "int8", INTEGER),
    ("int8-rr fake-quant", "int8-rr", FAKE_QUANT),
    ("int8-rr integer kernels", "int8-rr", INTEGER),
)


def _dices(masks: list[np.ndarray], against: list[np.ndarray]) -> dict[str, float]:
    values = [dice(a, b) for a, b in zip(masks, against, strict=True)]
    return {
        "mean": float(np.mean(values)),
        "min": float(np.min(values)),
        "frames_below_0.9": int(sum(v < FLOOR for v in values)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=48, help="held-out frames scored")
    parser.add_argument("--runs", type=int, default=200, help="timed single-frame runs per precision")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgescope-precision-"))
    bundles = {}
    for name, precision in BUNDLES.items():
        start = time.perf_counter()
        bundles[name] = export_model(
            ExportRequest(
                name=f"lesion-unet-{name}",
                output=work / name,
                factory=str(EXAMPLE / "model.py") + ":build",
                weights=EXAMPLE / "weights.pt",
                precision=precision,
                calibration_data=CALIBRATION if precision == "int8" else None,
                calibration_samples=32,
                reduce_range=name == "int8-rr",
                engines=False,
                force=True,  # measured either way; the gate's verdict is reported below
            ),
            log=lambda _line: None,
        )
        verdict = "passed" if bundles[name].manifest.validation.passed else "FAILED"
        print(f"exported {name} in {time.perf_counter() - start:.1f} s (gate {verdict})")

    spec = bundles["fp32"].manifest.preprocessing
    params = bundles["fp32"].manifest.postprocessing.segmentation
    frames = calibration_inputs(TEST, args.frames, spec)
    model = load_model(str(EXAMPLE / "model.py") + ":build", EXAMPLE / "weights.pt", None)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        torch_masks = [segmentation_mask(model(torch.from_numpy(x)).numpy(), params) for x in frames]

    results: dict[str, dict[str, Any]] = {}
    masks: dict[str, list[np.ndarray]] = {}
    for name, bundle_name, quant in RUNS:
        bundle = bundles[bundle_name]
        runner = onnxruntime_runner(bundle.onnx_path, bundle.manifest.precision, quant=quant, threads=args.threads)
        masks[name] = [segmentation_mask(runner.infer({"image": x})["logits"], params) for x in frames]
        for _ in range(10):
            runner.infer({"image": frames[0]})
        times = []
        for i in range(args.runs):
            x = frames[i % len(frames)]
            start = time.perf_counter()
            runner.infer({"image": x})
            times.append((time.perf_counter() - start) * 1000.0)
        check = self_test(bundle, runner.infer, runner.info)
        gate = bundle.manifest.validation
        results[name] = {
            "runner": runner.info.kind + " " + runner.info.version,
            "gate_passed": gate.passed,
            "gate": {"data": gate.data_source, "frames": gate.samples, **{m.name: m.value for m in gate.metrics}},
            "self_test_passed": check.passed,
            "self_test_reasons": list(check.reasons),
            "model_bytes": bundle.onnx_path.stat().st_size,
            "dice_vs_pytorch": _dices(masks[name], torch_masks),
            "latency_ms_p50": float(np.median(times)),
            "latency_ms_p95": float(np.percentile(times, 95)),
        }
    for name, r in results.items():
        r["dice_vs_fp32"] = _dices(masks[name], masks["fp32"])
        r["latency_vs_fp32"] = r["latency_ms_p50"] / results["fp32"]["latency_ms_p50"]

    machine = describe_machine()
    print(f"\nmachine: {machine_summary(machine)}; onnxruntime {ort.__version__}, {args.threads} threads")
    print(f"{args.frames} held-out frames ({TEST}); Dice of masks against PyTorch's")
    print(f"{'run':<25}{'mean':>8}{'min':>8}{'<0.9':>6}{'vs FP32 mean':>14}{'p50 ms':>9}{'vs FP32':>9}  self-test")
    for name, r in results.items():
        d, f = r["dice_vs_pytorch"], r["dice_vs_fp32"]
        verdict = "passed" if r["self_test_passed"] else "FAILED"
        print(
            f"{name:<25}{d['mean']:>8.4f}{d['min']:>8.4f}{d['frames_below_0.9']:>6}{f['mean']:>14.4f}"
            f"{r['latency_ms_p50']:>9.2f}{r['latency_vs_fp32']:>8.2f}x  {verdict}"
        )
    summary = {
        "what": "example lesion U-Net, ONNX Runtime CPU, batch 1, 256x256",
        "frames": args.frames,
        "test_source": TEST,
        "calibration_source": CALIBRATION,
        "runs": args.runs,
        "threads": args.threads,
        "onnxruntime": ort.__version__,
        "machine": json_format.MessageToDict(machine),
        "machine_summary": machine_summary(machine),
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
    names = list(results)
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#dd8452", "#937860"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    left.bar(names, [results[n]["latency_ms_p50"] for n in names], color=colors)
    left.set_ylabel("median latency per frame (ms)")
    left.set_title(f"ONNX Runtime CPU, {args.threads} threads (rough: shared machine)")
    positions = np.arange(len(names))
    right.bar(positions - 0.2, [results[n]["dice_vs_pytorch"]["mean"] for n in names], 0.4, color=colors)
    right.bar(positions + 0.2, [results[n]["dice_vs_pytorch"]["min"] for n in names], 0.4, color=colors, alpha=0.45)
    right.axhline(FLOOR, color="black", linewidth=0.8, linestyle="--")
    right.set_xticks(positions, names)
    right.set_ylim(0.0, 1.02)
    right.set_ylabel("Dice vs PyTorch: mean (solid), worst frame (pale)")
    right.set_title(f"{args.frames} held-out frames; dashed: per-frame floor {FLOOR}")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=7, labelrotation=20)
    figure.suptitle(machine_summary(machine), fontsize=9)
    figure.tight_layout()
    figure.savefig(RESULTS / "precision.png", dpi=120)
    print(f"wrote {RESULTS / 'precision.png'}")


if __name__ == "__main__":
    main()
