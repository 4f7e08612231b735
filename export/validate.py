"""``edgescope validate BUNDLE``: check a bundle that exists.

Two ways, by what the user gives:

- nothing but the bundle: its golden frames run through ONNX Runtime on this
  machine, as the gate ran the graph (a Q/DQ graph as fake-quant) and, for
  INT8, through this CPU's integer kernels as the server would; the stored
  reference outputs judge. Needs no torch and runs no code from the bundle.
- the model (``--factory`` with ``--weights``, or ``--torchscript``): the
  accuracy gate re-runs against PyTorch on representative frames, as export
  runs it; the report and fresh golden frames replace the bundle's and the
  manifest is re-hashed, so a bundle that no longer passes is refused by the
  server like any failed export. The model source is only ever what the
  command line names: a factory recorded in a manifest is never imported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgescope.bundle import Bundle, load_bundle, sha256_file, write_manifest
from edgescope.engines import PRECISION_NAMES
from edgescope.errors import ConfigError, ExportError
from edgescope.export import tasks
from edgescope.export.gate import judge, keep_golden, representative_inputs
from edgescope.export.loading import load_model
from edgescope.export.outputs import task_model
from edgescope.export.runs import example_inputs, torch_runner
from edgescope.runtime.evaluation.golden import DEFAULT_GOLDEN_FRAMES
from edgescope.runtime.evaluation.limits import PRECISION_SAMPLES, gate_thresholds
from edgescope.runtime.evaluation.machine import describe_machine
from edgescope.runtime.evaluation.report import format_report
from edgescope.runtime.evaluation.runners import FAKE_QUANT, INTEGER, onnxruntime_runner, run
from edgescope.runtime.evaluation.selftest import format_self_test, onnxruntime_self_test
from edgescope.runtime.pipeline.state import source_inputs
from edgescope.v1 import manifest_pb2

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ValidateRequest:
    bundle: Path
    factory: str | None = None
    # Without one, the weights the manifest records (their sha256 must still match).
    weights: Path | None = None
    torchscript: Path | None = None
    data: str | None = None
    samples: int | None = None
    # Gate limits given by the user, each used as given; the rest are the precision's defaults.
    limits: Mapping[str, float] = field(default_factory=dict)
    golden_frames: int = DEFAULT_GOLDEN_FRAMES


def _weights(request: ValidateRequest, manifest: manifest_pb2.ModelManifest) -> Path | None:
    if request.weights is not None or request.torchscript is not None:
        return request.weights
    return Path(manifest.model_source.weights) if manifest.model_source.weights else None


def validate_bundle(request: ValidateRequest, log: Log = print) -> Bundle:
    """Re-run the gate against the PyTorch model the request names; save the report and golden frames."""

    if not (request.factory or request.torchscript):
        raise ConfigError(
            "re-running the gate needs the PyTorch model: pass --factory (with --weights, or the weights the "
            "manifest records) or --torchscript; edgescope never imports code a manifest names"
        )
    bundle = load_bundle(request.bundle)
    manifest = bundle.manifest
    if source_inputs(manifest):
        # The gate's frames of each other source are named at export only (--source-input).
        raise ConfigError(
            f"{manifest.name} is fed by several sources: its gate is re-run by exporting it again; "
            "`edgescope validate BUNDLE` without --factory still replays its golden frames"
        )
    precision = PRECISION_NAMES.get(manifest.precision, "fp32")
    thresholds = gate_thresholds(precision, request.limits)
    weights = _weights(request, manifest)
    source_file = weights or request.torchscript
    source_sha256 = sha256_file(source_file) if source_file is not None else ""
    if source_file is not None and manifest.source_sha256 and source_sha256 != manifest.source_sha256:
        raise ExportError(f"{source_file} is not the file this bundle was exported from (its sha256 differs)")
    data = request.data or manifest.validation.data_source or "synthetic:ultrasound"
    samples = request.samples or PRECISION_SAMPLES[precision]
    log(f"edgescope validate {request.bundle} ({precision})")
    start = time.perf_counter()
    task = manifest_pb2.Task.Name(manifest.task).removeprefix("TASK_").lower()
    # The same module and runners as export: task wrappers, state and every input and output.
    inputs = representative_inputs(data, samples, manifest.preprocessing)
    loaded = load_model(request.factory, weights, request.torchscript)
    # The model's returned values the export kept (its --output), in the graph's output order.
    outputs = [spec.name for spec in manifest.outputs]
    first = example_inputs(manifest, inputs[0], batch=1)
    model = tasks.for_task(task_model(loaded, first, manifest.model_source.outputs, outputs), task)
    reference = run(torch_runner(model, manifest, source_sha256, log), manifest, inputs)
    candidate = run(onnxruntime_runner(bundle.onnx_path, manifest.precision), manifest, inputs)
    log(f"  {'run PyTorch and ONNX Runtime':<34} {time.perf_counter() - start:7.2f} s")
    gate = judge(reference, candidate, manifest, thresholds, data, describe_machine())
    log(format_report(gate.report))
    _log_engine_self_tests(manifest, log)
    manifest.validation.CopyFrom(gate.report)
    keep_golden(bundle.path, manifest, inputs, reference, gate, request.golden_frames, thresholds, data)
    write_manifest(bundle.path, manifest)
    log(f"saved the report and {request.golden_frames} golden frames in {bundle.path}")
    return load_bundle(bundle.path)


def self_test_bundle(path: Path, log: Log = print) -> list[manifest_pb2.SelfTestReport]:
    """Golden frames through ONNX Runtime here: as the gate ran the graph, then (INT8) this CPU's integer kernels.

    The first report is the verdict on the bundle; the second says whether a
    server on this CPU could run the INT8 graph with its integer kernels.
    """
    bundle = load_bundle(path)
    log(f"edgescope validate {path}: golden frames against their stored outputs")
    reports = [onnxruntime_self_test(bundle, quant=FAKE_QUANT)]
    if bundle.manifest.precision == manifest_pb2.PRECISION_INT8:
        reports.append(onnxruntime_self_test(bundle, quant=INTEGER))
    for report in reports:
        log(format_self_test(report))
    _log_engine_self_tests(bundle.manifest, log)
    log(format_domain_profile(bundle.manifest))
    return reports


def format_domain_profile(manifest: manifest_pb2.ModelManifest) -> str:
    """What the server's out-of-domain check and drift test compare frames with, or that it is off."""
    if not manifest.HasField("domain"):
        return "domain profile: none; the out-of-domain check and the drift test are off for this bundle"
    profile = manifest.domain
    lines = [
        f"domain profile: fitted on {profile.fit_frames} frames of {profile.data_source or '(source not recorded)'}"
        f" ({profile.held_out_frames} held out, {profile.held_out_above:.1%} of them above the threshold)",
        f"  threshold {profile.threshold:.3f} (distance) for a false-alarm rate of {profile.false_alarm_rate:g}",
    ]
    if profile.score_spread > 0:
        lines.append(
            f"  drift reference: squared distances ~ {profile.score_spread:.4g} * chi2({profile.score_degrees:.4g})"
        )
    else:
        lines.append("  drift reference: none (no drift test on streams)")
    width = max((len(name) for name in profile.features), default=7)
    lines.append(f"  {'feature':<{width}} {'mean':>11} {'spread':>11}")
    for name, mean, scale in zip(profile.features, profile.mean, profile.scale, strict=False):
        lines.append(f"  {name:<{width}} {mean:>11.4g} {scale:>11.4g}")
    return "\n".join(lines)


def _log_engine_self_tests(manifest: manifest_pb2.ModelManifest, log: Log) -> None:
    """Engines are checked on their GPU when built; here their verdicts are only reported."""
    for entry in manifest.engines:
        verdict = "passed" if entry.self_test.passed else "FAILED"
        log(f"  {entry.plan}: TensorRT {entry.tensorrt_version} on {entry.gpu_name}, self-test at build {verdict}")
