"""The evaluator's parts on hand-made outputs: floors and means, reasons, limits, machine, runners."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from edgescope.errors import BackendError
from edgescope.runtime.evaluation.limits import PRECISION_THRESHOLDS, GateThresholds, gate_thresholds
from edgescope.runtime.evaluation.machine import cpu_description, machine_summary
from edgescope.runtime.evaluation.metrics import compare
from edgescope.runtime.evaluation.report import evaluate, format_report
from edgescope.runtime.evaluation.runners import FAKE_QUANT, Run, describe, stored_runner
from edgescope.v1 import manifest_pb2

X86_FLAGS_V3 = (
    "fpu sse sse2 ssse3 pni cx16 lahf_lm popcnt sse4_1 sse4_2 avx avx2 bmi1 bmi2 f16c fma abm movbe xsave aes"
)
X86_FLAGS_V4_VNNI = X86_FLAGS_V3 + " avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni"


def _segmentation() -> manifest_pb2.ModelManifest:
    manifest = manifest_pb2.ModelManifest(task=manifest_pb2.TASK_SEGMENTATION)
    manifest.postprocessing.output = "logits"
    manifest.postprocessing.segmentation.CopyFrom(
        manifest_pb2.SegmentationParams(activation=manifest_pb2.ACTIVATION_SIGMOID, threshold=0.5)
    )
    manifest.inputs.add(name="image")
    manifest.outputs.add(name="logits")
    return manifest


def _lesion(rows: int) -> np.ndarray:
    """Logits of a 20-pixel-wide lesion ``rows`` tall in a 32x32 frame."""
    logits = np.full((1, 1, 32, 32), -5.0, np.float32)
    logits[0, 0, 4 : 4 + rows, 4:24] = 5.0
    return logits


def _metrics(metrics: list[manifest_pb2.MetricValue]) -> dict[str, manifest_pb2.MetricValue]:
    return {m.name: m for m in metrics}


def test_a_frame_below_the_floor_fails_even_when_the_mean_passes() -> None:
    reference = [{"logits": _lesion(10)} for _ in range(20)]
    candidate = [dict(r) for r in reference]
    candidate[7] = {"logits": _lesion(5)}  # one frame loses half its lesion: Dice 0.67
    limits = GateThresholds(max_abs_error=100.0, min_dice=0.95, min_frame_dice=0.9)
    metrics = _metrics(compare(reference, candidate, _segmentation(), limits))
    assert metrics["dice_mean"].passed and metrics["dice_mean"].value > 0.98
    floor = metrics["dice_min"]
    assert not floor.passed and floor.per_frame
    assert (floor.frames_failed, floor.worst_frame) == (1, 7)
    assert floor.value == pytest.approx(2 * 100 / 300)


def test_per_frame_only_reports_the_mean_without_a_limit() -> None:
    reference = [{"logits": _lesion(10)}, {"logits": _lesion(10)}]
    candidate = [{"logits": _lesion(10)}, {"logits": _lesion(9)}]  # Dice 0.947 on the second frame
    limits = GateThresholds(max_abs_error=100.0, min_dice=0.99, min_frame_dice=0.9)
    strict = _metrics(compare(reference, candidate, _segmentation(), limits))
    assert not strict["dice_mean"].passed
    floors = _metrics(compare(reference, candidate, _segmentation(), limits, per_frame_only=True))
    assert floors["dice_mean"].passed and floors["dice_mean"].threshold == float("-inf")
    assert floors["dice_min"].passed


def test_a_share_that_must_be_whole_is_a_floor_even_on_few_frames() -> None:
    manifest = manifest_pb2.ModelManifest(task=manifest_pb2.TASK_ANOMALY)
    manifest.postprocessing.output = "out"
    manifest.postprocessing.anomaly.score_threshold = 0.5
    reference = [np.full((1, 1, 4, 4), v, np.float32) for v in (0.1, 0.49, 0.9)]
    candidate = [np.full((1, 1, 4, 4), v, np.float32) for v in (0.1, 0.51, 0.9)]
    flips = _metrics(compare(reference, candidate, manifest, GateThresholds(max_abs_error=1.0), per_frame_only=True))
    decision = flips["decision_agreement"]
    assert not decision.passed and decision.per_frame and (decision.frames_failed, decision.worst_frame) == (1, 1)


def test_report_names_runners_machine_and_each_reason() -> None:
    manifest = _segmentation()
    reference = Run(manifest_pb2.RunnerInfo(kind="pytorch", version="2.13.0", device="cpu"), [])
    candidate_info = manifest_pb2.RunnerInfo(
        kind="onnxruntime", version="1.32.0", device="cpu", precision=manifest_pb2.PRECISION_INT8, quant_execution=2
    )
    frames = [{"logits": _lesion(10)} for _ in range(4)]
    worse = [frames[0], frames[1], {"logits": _lesion(2)}, frames[3]]
    machine = cpu_description(f"model name\t: Test CPU\nflags\t\t: {X86_FLAGS_V3}\n", "x86_64")
    report, comparison = evaluate(
        Run(reference.info, frames),
        Run(candidate_info, worse),
        manifest,
        PRECISION_THRESHOLDS["int8"],
        data_source="synthetic:ultrasound",
        machine=machine,
    )
    assert not report.passed
    assert report.candidate == "onnxruntime 1.32.0 cpu int8 fake-quant"
    assert report.precision == manifest_pb2.PRECISION_INT8 and report.machine.isa_level == "x86-64-v3"
    assert report.reasons[0] == "dice_min: 1 of 4 frames below 0.9 (worst 0.3333, frame 2)"
    assert any(r.startswith("dice_mean 0.8333 is below the limit 0.95") for r in report.reasons)
    assert comparison.frame_scores is not None and comparison.frame_scores[2] == pytest.approx(1 / 3)
    text = format_report(report)
    assert "Test CPU (x86_64, x86-64-v3, no VNNI)" in text and "1/4" in text and "accuracy gate FAILED" in text


def test_limits_travel_in_the_manifest_under_the_same_names() -> None:
    assert {f.name for f in fields(GateThresholds)} == set(manifest_pb2.GateLimits.DESCRIPTOR.fields_by_name)
    limits = PRECISION_THRESHOLDS["int8"]
    assert GateThresholds.from_proto(limits.to_proto()) == limits  # infinity included


def test_limits_left_at_defaults_take_the_precision_defaults() -> None:
    mine = gate_thresholds("int8", {"min_dice": 0.97})
    assert mine.min_dice == 0.97  # the user's own limit stands
    assert mine.max_abs_error == float("inf") and mine.min_frame_dice == 0.9
    assert gate_thresholds("fp32", {}) == GateThresholds()
    # A limit given at the FP32 default's value is still the user's: not replaced by the precision's own.
    assert gate_thresholds("fp16", {"max_abs_error": 1e-3}).max_abs_error == 1e-3
    assert gate_thresholds("fp16", {}).max_abs_error == 0.5


@pytest.mark.parametrize(
    ("cpuinfo", "architecture", "level", "features", "summary"),
    [
        (f"model name\t: AMD EPYC\nflags\t\t: {X86_FLAGS_V3}\n", "x86_64", "x86-64-v3", ["avx2", "fma"], "no VNNI"),
        (
            f"model name\t: Xeon\nflags\t\t: {X86_FLAGS_V4_VNNI}\n",
            "x86_64",
            "x86-64-v4",
            ["avx2", "fma", "avx512f", "avx512_vnni"],
            "AVX-512 VNNI",
        ),
        ("flags\t\t: fpu sse sse2\n", "x86_64", "x86-64", [], "no VNNI"),
        (
            "processor\t: 0\nFeatures\t: fp asimd asimdhp asimddp i8mm\nCPU implementer\t: 0x41\nCPU part\t: 0xd42\n",
            "aarch64",
            "aarch64",
            ["asimd", "asimdhp", "asimddp", "i8mm"],
            "asimd asimdhp asimddp i8mm",
        ),
    ],
)
def test_machine_levels_and_features(
    cpuinfo: str, architecture: str, level: str, features: list[str], summary: str
) -> None:
    machine = cpu_description(cpuinfo, architecture)
    assert machine.isa_level == level
    assert list(machine.isa_features) == features
    assert summary in machine_summary(machine)


def test_stored_outputs_answer_only_the_saved_frames_in_order() -> None:
    manifest = _segmentation()
    inputs = [np.full((1, 1, 2, 2), i, np.float32) for i in range(2)]
    outputs = [{"logits": np.full((1, 1, 2, 2), 10.0 * i, np.float32)} for i in range(2)]
    runner = stored_runner(manifest, inputs, outputs, manifest_pb2.RunnerInfo(kind="stored"))
    assert runner.infer({"image": inputs[0]})["logits"][0, 0, 0, 0] == 0.0
    with pytest.raises(BackendError, match="order"):
        runner.infer({"image": inputs[0]})


def test_describe_says_how_quantised_arithmetic_ran() -> None:
    info = manifest_pb2.RunnerInfo(
        kind="tensorrt",
        version="10.16.1.11",
        device="cuda:0",
        precision=manifest_pb2.PRECISION_INT8,
        quant_execution=manifest_pb2.QUANT_EXECUTION_INTEGER,
        detail="engines/x.plan",
    )
    assert describe(info) == "tensorrt 10.16.1.11 cuda:0 int8 integer kernels (engines/x.plan)"
    assert describe(manifest_pb2.RunnerInfo(kind="onnxruntime", quant_execution=FAKE_QUANT)).endswith("fake-quant")


def test_the_evaluator_imports_without_torch_tensorrt_or_cuda() -> None:
    code = (
        "import sys, edgescope.runtime.evaluation; "
        "print(sorted(m for m in ('torch', 'tensorrt', 'cuda') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
