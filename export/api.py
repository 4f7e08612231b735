"""One-call export: model -> ONNX -> accuracy gate -> bundle with golden frames.

::

    from edgescope.export import ExportRequest, export_model
    export_model(ExportRequest(name="lesion-unet", output=Path("bundles/lesion-unet"),
                               factory="examples/ultrasound_unet/model.py:build",
                               weights=Path("examples/ultrasound_unet/weights.pt")))

Every step prints one timing line. Nothing is written at ``output`` unless
every step succeeds (or the user forces a bundle that failed the gate, which
the manifest then records).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import onnx
import onnxruntime as ort

import edgescope
from edgescope.bundle import (
    ONNX_FILE,
    SIGNATURE_FILE,
    Bundle,
    load_bundle,
    sha256_file,
    staged_bundle,
    write_manifest,
)
from edgescope.errors import ConfigError, ExportError, MissingDependencyError, ValidationFailedError
from edgescope.export import tasks
from edgescope.export.domain import domain_profile, profiled
from edgescope.export.gate import judge, keep_golden, representative_inputs
from edgescope.export.label_codes import load_label_codes
from edgescope.export.loading import load_model
from edgescope.export.onnx_export import DEFAULT_OPSET, export_onnx
from edgescope.export.outputs import task_model
from edgescope.export.precision import FP16_FP32_OPS, PrecisionOptions, check_options, reduce_precision
from edgescope.export.runs import check_batch, example_inputs, torch_runner
from edgescope.export.sources import SignalInput, SourceInput, add_source_inputs, gate_source_frames
from edgescope.export.tasks import StateSpec
from edgescope.export.tensorrt import EngineOptions, build_engine
from edgescope.export.triton import write_repository
from edgescope.runtime.evaluation.golden import DEFAULT_GOLDEN_FRAMES
from edgescope.runtime.evaluation.limits import PRECISION_SAMPLES, PRECISIONS, gate_thresholds
from edgescope.runtime.evaluation.machine import describe_machine, machine_summary
from edgescope.runtime.evaluation.report import evaluate, format_report
from edgescope.runtime.evaluation.runners import INTEGER, Run, onnxruntime_runner, run, run_stream
from edgescope.runtime.evaluation.selftest import onnxruntime_self_test
from edgescope.runtime.pipeline.domain import DEFAULT_FALSE_ALARM_RATE
from edgescope.runtime.pipeline.layout import MAX_CHANNELS
from edgescope.runtime.pipeline.preprocess import input_channels
from edgescope.signing import load_private_key, sign_bundle
from edgescope.v1 import manifest_pb2

Log = Callable[[str], None]
T = TypeVar("T")

_COLORS: dict[str, manifest_pb2.ColorMode.ValueType] = {
    "gray": manifest_pb2.COLOR_MODE_GRAY,
    "rgb": manifest_pb2.COLOR_MODE_RGB,
    "bgr": manifest_pb2.COLOR_MODE_BGR,
    "channels": manifest_pb2.COLOR_MODE_CHANNELS,
}
_RESIZE: dict[str, manifest_pb2.ResizeMode.ValueType] = {
    "stretch": manifest_pb2.RESIZE_MODE_STRETCH,
    "letterbox": manifest_pb2.RESIZE_MODE_LETTERBOX,
}
_ACTIVATIONS: dict[str, manifest_pb2.Activation.ValueType] = {
    "sigmoid": manifest_pb2.ACTIVATION_SIGMOID,
    "softmax": manifest_pb2.ACTIVATION_SOFTMAX,
    "none": manifest_pb2.ACTIVATION_NONE,
}
SUPPORTED_TASKS: dict[str, manifest_pb2.Task.ValueType] = {
    "segmentation": manifest_pb2.TASK_SEGMENTATION,
    "classification": manifest_pb2.TASK_CLASSIFICATION,
    "detection": manifest_pb2.TASK_DETECTION,
    "image": manifest_pb2.TASK_IMAGE,
    "anomaly": manifest_pb2.TASK_ANOMALY,
    "registration": manifest_pb2.TASK_REGISTRATION,
}
SUPPORTED_PRECISIONS: dict[str, manifest_pb2.Precision.ValueType] = dict(PRECISIONS)
INTENSITY_TRANSFORMS: dict[str, manifest_pb2.IntensityTransform.ValueType] = {
    "presentation": manifest_pb2.INTENSITY_TRANSFORM_PRESENTATION,
    "modality": manifest_pb2.INTENSITY_TRANSFORM_MODALITY,
    "stored": manifest_pb2.INTENSITY_TRANSFORM_STORED,
}
FORMATS = {
    "bundle": "manifest.json + model.onnx (+ engines/): what edgescope serve loads",
    "triton": "a Triton Inference Server model repository under the bundle's triton/",
}


@dataclass(slots=True)
class ExportRequest:
    """What to export and how the runtime should feed and read the model."""

    name: str
    output: Path
    factory: str | None = None
    weights: Path | None = None
    torchscript: Path | None = None
    # A program saved by torch.export.save (.pt2), exported with a dynamic batch axis.
    exported_program: Path | None = None
    version: str = "1"
    description: str = ""
    task: str = "segmentation"
    precision: str = "fp32"
    input_height: int = 256
    input_width: int = 256
    # gray, rgb, bgr, or "channels": frames of `channels` channels taken as sent (multi-channel MR, features).
    color: str = "gray"
    # The input's channel count; 0: as the colour implies. Needed for color "channels".
    channels: int = 0
    resize: str = "stretch"
    scale: float = 1.0 / 255.0
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    # DICOM frames: "presentation" (modality LUT, VOI, MONOCHROME1 inverted), "modality" or "stored" values.
    intensity: str = "presentation"
    # The window or VOI LUT the model was trained with: an explanation, or a position; "" the frame's own.
    voi: str = ""
    labels: list[str] = field(default_factory=lambda: ["background", "lesion"])
    # Segmentation, classification, detection: each label's DICOM codes (export/label_codes.py), a .json or
    # .toml file; None: the DICOM writers' own rules ("lesion" a lesion, other labels tissue; a local scheme).
    label_codes: Path | None = None
    activation: str = "sigmoid"
    threshold: float = 0.5
    min_component_pixels: int = 0
    data: str = "synthetic:ultrasound"
    # Frames the gate runs; None: the precision's default (16 for FP32, 48 below).
    samples: int | None = None
    # Gate limits given by the user (``GateThresholds`` field names): each used as given; the rest
    # are the precision's defaults.
    limits: Mapping[str, float] = field(default_factory=dict)
    # Of the gate's frames, how many the bundle keeps to self-test on every device.
    golden_frames: int = DEFAULT_GOLDEN_FRAMES
    # Frames of ``data`` the domain profile is fitted on (0: no profile), and the share of in-domain
    # frames its threshold may call out of domain.
    reference_samples: int = 96
    domain_false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
    force: bool = False
    overwrite: bool = False
    opset: int = DEFAULT_OPSET
    input_name: str = "image"
    output_name: str = "logits"
    # Which of the model's returned values are the graph's outputs (position or name, in graph
    # output order); empty: the model returns exactly those (see export/outputs.py).
    model_outputs: tuple[str, ...] = ()
    # The batch axis fixed at one frame, for models whose code cannot take a dynamic batch.
    static_batch: bool = False
    # Tasks beyond segmentation (export/tasks.py says which inputs and outputs each has).
    previous_frame_input: str = ""
    state: list[StateSpec] = field(default_factory=list)
    # A model fed by several sources: the frame's source name, and each other source's input
    # (export/sources.py), fed to the graph after the frame in this order.
    frame_source: str = ""
    source_inputs: list[SourceInput | SignalInput] = field(default_factory=list)
    scores_output: str = "scores"
    box_format: str = "xyxy"
    score_threshold: float = 0.5
    iou_threshold: float = 0.5
    max_boxes: int = 100
    anomaly_threshold: float = 0.01
    heatmap: str = "fixed"
    heatmap_max: float = 0.1
    output_range: tuple[float, float] = (0.0, 1.0)
    displacement_units: str = "pixels"
    # Precision: FP16 keeps these op types in FP32; INT8 calibrates on frames
    # from calibration_data (a source spec or a folder), never the gate's own.
    fp32_ops: tuple[str, ...] = FP16_FP32_OPS
    calibration_data: str | None = None
    calibration_samples: int = 32
    calibration_method: str = "minmax"
    # INT8 weights in 7 bits, so ONNX Runtime's integer kernels on x86 without VNNI reproduce the graph.
    reduce_range: bool = False
    # Artifacts besides the bundle: "triton" adds a Triton model repository under triton/.
    formats: tuple[str, ...] = ("bundle",)
    # TensorRT engines: None builds them when TensorRT and a GPU are here, True requires them, False skips.
    engines: bool | None = None
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    # Ed25519 private key (PEM) that signs the finished bundle's manifest; None: unsigned.
    sign_key: Path | None = None

    def precision_options(self) -> PrecisionOptions:
        return PrecisionOptions(
            precision=self.precision,
            fp32_ops=self.fp32_ops,
            calibration_data=self.calibration_data,
            calibration_samples=self.calibration_samples,
            calibration_method=self.calibration_method,
            reduce_range=self.reduce_range,
        )


def _choice(value: str, options: Mapping[str, T], what: str) -> T:
    if value not in options:
        raise ConfigError(f"{what} {value!r} is not supported; choose one of: {', '.join(options)}")
    return options[value]


def _channels(request: ExportRequest, color: manifest_pb2.ColorMode.ValueType) -> int:
    """The input's channel count, with the per-channel normalisation checked against it."""
    if color == manifest_pb2.COLOR_MODE_CHANNELS:
        if not 1 <= request.channels <= MAX_CHANNELS:
            raise ConfigError(f"frames taken as sent need a channel count from 1 to {MAX_CHANNELS} (--channels N)")
        channels = request.channels
    else:
        channels = input_channels(manifest_pb2.Preprocessing(color=color))
        if request.channels and request.channels != channels:
            raise ConfigError(
                f"--color {request.color} gives {channels} channel(s), --channels says {request.channels}; "
                "for frames whose channels are taken as sent, leave --color out"
            )
    for name, values in (("mean", request.mean), ("std", request.std)):
        if len(values) not in (0, 1, channels):
            raise ConfigError(
                f"--{name} has {len(values)} values for a {channels}-channel input; give one, or one per channel"
            )
    if any(v <= 0 for v in request.std):
        raise ConfigError(f"--std values must be positive, got {request.std}")
    return channels


def build_manifest(request: ExportRequest) -> manifest_pb2.ModelManifest:
    """The manifest's model description (files and validation are added later)."""
    task = _choice(request.task, SUPPORTED_TASKS, "task")
    precision = _choice(request.precision, SUPPORTED_PRECISIONS, "precision")
    if request.input_height <= 0 or request.input_width <= 0:
        raise ConfigError(f"input size {request.input_height}x{request.input_width} must be positive")
    color = _choice(request.color, _COLORS, "color")
    channels = _channels(request, color)
    manifest = manifest_pb2.ModelManifest(
        schema_version=1,
        name=request.name,
        version=request.version,
        description=request.description,
        task=task,
        precision=precision,
        labels=request.labels,
        preprocessing=manifest_pb2.Preprocessing(
            height=request.input_height,
            width=request.input_width,
            color=color,
            channels=channels,
            resize=_choice(request.resize, _RESIZE, "resize"),
            layout=manifest_pb2.LAYOUT_NCHW,
            scale=request.scale,
            mean=request.mean,
            std=request.std,
            intensity=_choice(request.intensity, INTENSITY_TRANSFORMS, "intensity transform"),
        ),
        postprocessing=tasks.postprocessing(request, task, _choice(request.activation, _ACTIVATIONS, "activation")),
    )
    shape = [
        tasks.batch_dim(request),
        manifest_pb2.Dim(size=channels),
        manifest_pb2.Dim(size=request.input_height),
        manifest_pb2.Dim(size=request.input_width),
    ]
    manifest.inputs.append(
        manifest_pb2.TensorSpec(name=request.input_name, dtype=manifest_pb2.DATA_TYPE_FLOAT32, shape=shape)
    )
    if request.voi.strip().isdigit():
        manifest.preprocessing.voi_index = int(request.voi)
    elif request.voi:
        manifest.preprocessing.voi_explanation = request.voi
    add_source_inputs(manifest, request.frame_source, request.source_inputs, tasks.batch_dim(request), request.scale)
    tasks.add_inputs(manifest, request)
    if request.label_codes is not None:
        if task not in _CODED_TASKS:
            raise ConfigError(
                f"--label-codes code a Segmentation's segments or a report's findings; task {request.task} "
                "makes neither"
            )
        segmentation = task == manifest_pb2.TASK_SEGMENTATION
        manifest.label_codes.extend(load_label_codes(request.label_codes, request.labels, background=segmentation))
    return manifest


# The tasks whose results are written as DICOM objects that code their labels (runtime/archive).
_CODED_TASKS = (manifest_pb2.TASK_SEGMENTATION, manifest_pb2.TASK_CLASSIFICATION, manifest_pb2.TASK_DETECTION)

_ONNX_DTYPES: dict[int, manifest_pb2.DataType.ValueType] = {
    onnx.TensorProto.FLOAT: manifest_pb2.DATA_TYPE_FLOAT32,
    onnx.TensorProto.FLOAT16: manifest_pb2.DATA_TYPE_FLOAT16,
    onnx.TensorProto.INT8: manifest_pb2.DATA_TYPE_INT8,
    onnx.TensorProto.UINT8: manifest_pb2.DATA_TYPE_UINT8,
    onnx.TensorProto.UINT16: manifest_pb2.DATA_TYPE_UINT16,
    onnx.TensorProto.INT32: manifest_pb2.DATA_TYPE_INT32,
    onnx.TensorProto.INT64: manifest_pb2.DATA_TYPE_INT64,
    onnx.TensorProto.BOOL: manifest_pb2.DATA_TYPE_BOOL,
}


def _output_spec(proto: onnx.ModelProto, name: str) -> manifest_pb2.TensorSpec:
    for output in proto.graph.output:
        if output.name == name:
            tensor_type = output.type.tensor_type
            dtype = _ONNX_DTYPES.get(tensor_type.elem_type)
            if dtype is None:
                element = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
                raise ExportError(f"output {name!r} has element type {element}, which bundles cannot describe")
            dims = [
                manifest_pb2.Dim(symbol=d.dim_param) if d.dim_param else manifest_pb2.Dim(size=d.dim_value)
                for d in tensor_type.shape.dim
            ]
            return manifest_pb2.TensorSpec(name=name, dtype=dtype, shape=dims)
    raise ExportError(f"the ONNX graph has no output named {name!r}")


@contextmanager
def _step(log: Log, what: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    log(f"  {what:<34} {time.perf_counter() - start:7.2f} s")


def export_model(request: ExportRequest, log: Log = print) -> Bundle:
    """Export, validate and write a bundle; raises ExportError (or a subclass) on failure."""
    import torch

    manifest = build_manifest(request)
    check_options(request.precision_options(), request.data)
    if request.precision == "int8" and len(manifest.inputs) > 1:
        raise ConfigError("INT8 calibration feeds one image input; this model has several (use fp16 or fp32)")
    unknown = set(request.formats) - set(FORMATS)
    if unknown:
        raise ConfigError(f"format {', '.join(sorted(unknown))} is not supported; choose from: {', '.join(FORMATS)}")
    thresholds = gate_thresholds(request.precision, request.limits)
    # Read the key before minutes of export, so a wrong path fails first.
    signing_key = load_private_key(request.sign_key) if request.sign_key is not None else None
    samples = request.samples or PRECISION_SAMPLES[request.precision]
    machine = describe_machine()
    log(f"edgescope export {request.name} -> {request.output}")
    source_file = request.weights or request.torchscript or request.exported_program
    source_sha256 = sha256_file(source_file) if source_file is not None else ""
    with _step(log, f"read {samples} frames from {request.data}"):
        inputs = representative_inputs(request.data, samples, manifest.preprocessing)
        sources = gate_source_frames(manifest, request.source_inputs, samples)
    with _step(log, "load PyTorch model"):
        loaded = load_model(
            request.factory, request.weights, request.torchscript, request.exported_program, request.static_batch
        )
        # Run once on the first frame: a model returning more than the graph takes is refused here,
        # with what it returns, rather than deep inside torch's exporter.
        first = example_inputs(manifest, inputs[0], batch=1, sources=sources[0] if sources else None)
        model = tasks.for_task(
            task_model(loaded, first, request.model_outputs, tasks.output_names(request)), request.task
        )
    with staged_bundle(request.output, overwrite=request.overwrite) as staging:
        onnx_path = staging / ONNX_FILE
        with _step(log, f"export ONNX (opset {request.opset})"):
            proto = export_onnx(
                model,
                example_inputs(manifest, inputs[0], sources=sources[0] if sources else None),
                onnx_path,
                input_name=tasks.input_names(request),
                output_name=tasks.output_names(request),
                opset=request.opset,
                static_batch=request.static_batch,
            )
            for key, value in (
                ("edgescope.name", request.name),
                ("edgescope.version", request.version),
                ("edgescope.task", request.task),
            ):
                proto.metadata_props.add(key=key, value=value)
            onnx.save(proto, str(onnx_path))
            manifest.outputs.extend(_output_spec(proto, name) for name in tasks.output_names(request))
        with _step(log, "run PyTorch and ONNX Runtime"):
            # Frames run as one stream: recurrent state and the previous frame carry over.
            reference = run(torch_runner(model, manifest, source_sha256, log), manifest, inputs, sources)
            fp32 = onnxruntime_runner(onnx_path, manifest_pb2.PRECISION_FP32)
            feeds, fp32_outputs = run_stream(fp32.infer, manifest, inputs, sources)
            if not request.static_batch:
                # The FP32 graph, held to the FP32 tolerances (with the user's own where given).
                fp32_limits = gate_thresholds("fp32", request.limits)
                check_batch(fp32.infer, feeds, fp32_outputs, fp32_limits.max_abs_error, fp32_limits.rtol)
        fp32_run = Run(fp32.info, fp32_outputs)
        if request.precision == "fp32":
            gate = judge(reference, fp32_run, manifest, thresholds, request.data, machine)
        else:
            with _step(log, f"convert to {request.precision}"):
                settings = reduce_precision(
                    onnx_path, request.precision_options(), manifest.preprocessing, request.input_name
                )
                manifest.precision_settings.CopyFrom(settings)
            with _step(log, f"run ONNX Runtime {request.precision}"):
                reduced = run(onnxruntime_runner(onnx_path, manifest.precision), manifest, inputs, sources)
            versus_fp32, _ = evaluate(
                fp32_run, reduced, manifest, thresholds, data_source=request.data, machine=machine
            )
            log(format_report(versus_fp32, title="versus the FP32 graph"))
            manifest.extra_validation.append(versus_fp32)
            gate = judge(reference, reduced, manifest, thresholds, request.data, machine)
        report = gate.report
        report.forced = request.force and not report.passed
        log(format_report(report))
        if not report.passed and not request.force:
            raise ValidationFailedError(
                f"{request.name}: the {request.precision} graph does not reproduce PyTorch within the limits "
                f"({'; '.join(report.reasons)}); nothing was written (fix the model or its calibration, "
                "or pass force to keep a bundle marked failed)"
            )
        manifest.validation.CopyFrom(report)
        if request.reference_samples > 0 and profiled(manifest):
            with _step(log, f"domain profile on {request.reference_samples} frames of {request.data}"):
                served = fp32 if request.precision == "fp32" else onnxruntime_runner(onnx_path, manifest.precision)
                manifest.domain.CopyFrom(
                    domain_profile(
                        served.infer, manifest, request.data, request.reference_samples, request.domain_false_alarm_rate
                    )
                )
        keep_golden(
            staging, manifest, inputs, reference, gate, request.golden_frames, thresholds, request.data, sources
        )
        manifest.versions.CopyFrom(
            manifest_pb2.Versions(
                edgescope=edgescope.__version__,
                torch=torch.__version__,
                onnx=onnx.__version__,
                opset=request.opset,
                onnxruntime=ort.__version__,
            )
        )
        manifest.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest.source_sha256 = source_sha256
        manifest.model_source.CopyFrom(
            manifest_pb2.ModelSource(
                factory=request.factory or "",
                weights=str(request.weights.resolve()) if request.weights else "",
                torchscript=str(request.torchscript.resolve()) if request.torchscript else "",
                outputs=request.model_outputs,
            )
        )
        write_manifest(staging, manifest)
    bundle = load_bundle(request.output)
    if request.precision == "int8":
        _log_integer_kernels(bundle, machine, log)
    bundle = _artifacts(bundle, request, log)
    if signing_key is not None:
        log(f"signed the manifest with key {sign_bundle(bundle.path, signing_key)[:16]} ({SIGNATURE_FILE})")
    log(f"wrote {request.output}: {', '.join(e.path for e in bundle.manifest.files)}, manifest.json")
    log(f"next: edgescope serve {request.output}    (re-check any time: edgescope validate {request.output})")
    return bundle


def _log_integer_kernels(bundle: Bundle, machine: manifest_pb2.Machine, log: Log) -> None:
    """Say whether ONNX Runtime's INT8 kernels on this CPU reproduce the gated graph (the load self-test decides)."""
    report = onnxruntime_self_test(bundle, quant=INTEGER)
    verdict = "reproduce the gated graph" if report.passed else f"do not reproduce it ({report.reasons[0]})"
    log(f"  onnxruntime's integer kernels on this CPU, {machine_summary(machine)}: {verdict}")


def _artifacts(bundle: Bundle, request: ExportRequest, log: Log) -> Bundle:
    """TensorRT engines and the Triton repository, built from the written bundle.

    The bundle is read back (and so verified again) only after something was added to it.
    """
    changed = False
    if request.engines is not False:
        options = replace(request.engine_options, force=request.engine_options.force or request.force)
        try:
            with _step(log, "TensorRT engine"):
                build_engine(bundle, options, log=log)
            changed = True
        except (MissingDependencyError, ValidationFailedError) as exc:
            if request.engines:
                raise
            log(f"  no TensorRT engine: {exc}")
    if "triton" in request.formats:
        with _step(log, "Triton model repository"):
            write_repository(load_bundle(bundle.path) if changed else bundle)
        changed = True
    return load_bundle(bundle.path) if changed else bundle
