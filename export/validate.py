"""``edgescope validate BUNDLE``: re-run the accuracy gate on a bundle that exists.

PyTorch (from the model source the manifest records, or one given again) and
ONNX Runtime run on the same representative frames; the report replaces the
manifest's and the manifest is re-written with fresh file hashes, so a bundle
that no longer passes is refused by the server like any failed export.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from edgescope.bundle import Bundle, load_bundle, sha256_file, write_manifest
from edgescope.engines import PRECISION_NAMES
from edgescope.errors import ConfigError, ExportError
from edgescope.export import tasks
from edgescope.export.api import representative_inputs
from edgescope.export.loading import load_model
from edgescope.export.precision import gate_thresholds
from edgescope.export.runs import onnx_runner, run_stream, torch_runner
from edgescope.export.validation import GateThresholds, compare, format_report
from edgescope.v1 import manifest_pb2

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ValidateRequest:
    bundle: Path
    factory: str | None = None
    weights: Path | None = None
    torchscript: Path | None = None
    data: str | None = None
    samples: int = 16
    thresholds: GateThresholds = field(default_factory=GateThresholds)


Source = tuple[str | None, Path | None, Path | None]


def _source(request: ValidateRequest, manifest: manifest_pb2.ModelManifest) -> Source:
    if request.factory or request.weights or request.torchscript:
        return request.factory, request.weights, request.torchscript
    recorded = manifest.model_source
    if not (recorded.factory or recorded.torchscript):
        raise ConfigError(
            f"{request.bundle}: the manifest records no model source; give it again with --factory and --weights "
            "or --torchscript"
        )
    return (
        recorded.factory or None,
        Path(recorded.weights) if recorded.weights else None,
        Path(recorded.torchscript) if recorded.torchscript else None,
    )


def validate_bundle(request: ValidateRequest, log: Log = print) -> Bundle:
    """Run the gate, print its table, save the report into the manifest; returns the re-read bundle."""
    import torch

    bundle = load_bundle(request.bundle)
    manifest = bundle.manifest
    precision = PRECISION_NAMES.get(manifest.precision, "fp32")
    thresholds = gate_thresholds(precision, request.thresholds)
    factory, weights, torchscript = _source(request, manifest)
    source_file = weights or torchscript
    if source_file is not None and manifest.source_sha256 and sha256_file(source_file) != manifest.source_sha256:
        raise ExportError(f"{source_file} is not the file this bundle was exported from (its sha256 differs)")
    data = request.data or manifest.validation.data_source or "synthetic:ultrasound"
    log(f"edgescope validate {request.bundle} ({precision})")
    start = time.perf_counter()
    task = manifest_pb2.Task.Name(manifest.task).removeprefix("TASK_").lower()
    # The same module and runners as export: task wrappers, state and every input and output.
    model = tasks.for_task(load_model(factory, weights, torchscript), task)
    inputs = representative_inputs(data, request.samples, manifest.preprocessing)
    _, reference = run_stream(torch_runner(model, manifest), manifest, inputs)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    _, candidate = run_stream(onnx_runner(session), manifest, inputs)
    log(f"  {'run PyTorch and ONNX Runtime':<34} {time.perf_counter() - start:7.2f} s")
    report = manifest_pb2.ValidationReport(
        reference=f"pytorch {torch.__version__}",
        candidate=f"onnxruntime {ort.__version__} CPU {precision}",
        samples=len(inputs),
        data_source=data,
        metrics=compare(reference, candidate, manifest, thresholds),
    )
    report.passed = all(m.passed for m in report.metrics)
    log(format_report(report))
    for entry in manifest.engines:
        # Running plans needs a GPU and the TensorRT backend; the gate here covers the graph they came from.
        log(f"  {entry.plan}: TensorRT {entry.tensorrt_version} on {entry.gpu_name}, not run by this gate")
    manifest.validation.CopyFrom(report)
    write_manifest(bundle.path, manifest)
    log(f"saved the report in {bundle.path / 'manifest.json'}")
    return load_bundle(bundle.path)
