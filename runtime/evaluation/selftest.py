"""The self-test: a device runs a bundle's golden frames before it serves the model.

Whatever will serve (ONNX Runtime with this machine's kernels, a TensorRT
engine on this GPU, a remote server) runs the golden frames through
``infer``, and must pass two checks:

- against the stored reference outputs (PyTorch), every frame within the
  gate's per-frame limits (a handful of frames says little about a mean);
- for reduced precision, against the outputs the gate accepted (the Q/DQ
  graph as fake-quant, the FP16 graph), within all the gate's limits: this
  device computes what was gated. This is the check that refuses ONNX
  Runtime's INT8 kernels on CPUs where they saturate.

The limits are the bundle's own (``manifest.golden.limits``); a runner of
another precision than the bundle's (a TensorRT 10 FP16 engine from an FP32
bundle) is held to its precision's default limits against the reference
only. A bundle without golden frames fails, with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from edgescope.bundle import Bundle
from edgescope.engines import PRECISION_NAMES
from edgescope.errors import BundleError
from edgescope.runtime.evaluation.golden import read_golden
from edgescope.runtime.evaluation.limits import PRECISION_THRESHOLDS, GateThresholds
from edgescope.runtime.evaluation.machine import describe_machine
from edgescope.runtime.evaluation.report import evaluate, format_report, now
from edgescope.runtime.evaluation.runners import (
    Infer,
    Run,
    Runner,
    describe,
    onnxruntime_runner,
    run,
    stored_runner,
)
from edgescope.v1 import manifest_pb2


def _stored(info: manifest_pb2.RunnerInfo, path: str) -> manifest_pb2.RunnerInfo:
    return manifest_pb2.RunnerInfo(
        kind="stored",
        precision=info.precision,
        detail=f"{path}: {describe(info)}",
        artifact_sha256=info.artifact_sha256,
    )


def self_test(
    bundle: Bundle,
    infer: Infer,
    runner: manifest_pb2.RunnerInfo,
    *,
    machine: manifest_pb2.Machine | None = None,
) -> manifest_pb2.SelfTestReport:
    """Run the bundle's golden frames through ``infer`` (described by ``runner``) on this device.

    Never raises for a model that misbehaves: the verdict and its reasons are in
    the report (``passed``, ``reasons``), ready for GetModel and provenance.
    """
    start = time.perf_counter()
    report = manifest_pb2.SelfTestReport(runner=runner, machine=machine or describe_machine(), created_at=now())

    def finish(*failures: str) -> manifest_pb2.SelfTestReport:
        report.reasons.extend(failures)
        report.passed = not report.reasons
        report.seconds = time.perf_counter() - start
        return report

    manifest = bundle.manifest
    try:
        golden = read_golden(bundle)
    except BundleError as exc:
        return finish(str(exc))
    spec = manifest.golden
    report.frames = len(golden.inputs)
    reference = run(
        stored_runner(manifest, golden.inputs, golden.reference, _stored(spec.reference_runner, spec.path)),
        manifest,
        golden.inputs,
        golden.sources,
    )
    try:
        candidate = run(Runner(infer, runner), manifest, golden.inputs, golden.sources)
    except Exception as exc:  # any failure of the runner is a refusal with its reason, never a crash at load
        return finish(f"{describe(runner)} failed on the golden frames: {type(exc).__name__}: {exc}")
    missing = sorted(set(spec.outputs) - set(candidate.outputs[0]))
    if missing:
        return finish(f"{describe(runner)} gave no {', '.join(missing)}; the bundle declares {', '.join(spec.outputs)}")

    precision = runner.precision or manifest.precision
    same_precision = precision == manifest.precision
    limits = (
        GateThresholds.from_proto(spec.limits)
        if same_precision
        else PRECISION_THRESHOLDS[PRECISION_NAMES.get(precision, "fp32")]
    )
    source = f"golden frames ({spec.path})"
    versus_reference, _ = evaluate(
        reference, candidate, manifest, limits, data_source=source, machine=report.machine, per_frame_only=True
    )
    report.versus_reference.CopyFrom(versus_reference)
    failures = [f"against {versus_reference.reference}: {reason}" for reason in versus_reference.reasons]
    if golden.gated is not None and same_precision:
        gated = Run(_stored(spec.gated_runner, spec.path), golden.gated)
        versus_gated, _ = evaluate(gated, candidate, manifest, limits, data_source=source, machine=report.machine)
        report.versus_gated.CopyFrom(versus_gated)
        failures += [f"against {versus_gated.reference}: {reason}" for reason in versus_gated.reasons]
    return finish(*failures)


def onnxruntime_self_test(
    bundle: Bundle,
    *,
    quant: manifest_pb2.QuantExecution.ValueType | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
) -> manifest_pb2.SelfTestReport:
    """The self-test of the bundle's graph in ONNX Runtime here (a Q/DQ graph as fake-quant unless INTEGER)."""
    runner = onnxruntime_runner(
        bundle.onnx_path, bundle.manifest.precision, quant=quant, providers=providers, threads=threads
    )
    return self_test(bundle, runner.infer, runner.info)


def format_self_test(report: manifest_pb2.SelfTestReport) -> str:
    """The verdict line, then each comparison's table."""
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"self-test {verdict}: {describe(report.runner)} on {report.frames} golden frames ({report.seconds:.2f} s)"
    ]
    lines.extend(f"  {reason}" for reason in report.reasons)
    if report.HasField("versus_reference"):
        lines.append(format_report(report.versus_reference, title="against the reference"))
    if report.HasField("versus_gated"):
        lines.append(format_report(report.versus_gated, title="against the gated outputs"))
    return "\n".join(lines)
