"""One-call export: model -> ONNX -> accuracy gate -> bundle.

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np
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
from edgescope.export.loading import load_model
from edgescope.export.onnx_export import DEFAULT_OPSET, export_onnx
from edgescope.export.precision import (
    FP16_FP32_OPS,
    PRECISIONS,
    PrecisionOptions,
    check_options,
    gate_thresholds,
    reduce_precision,
)
from edgescope.export.runs import check_batch, example_inputs, onnx_runner, run_stream, torch_runner
from edgescope.export.tasks import StateSpec
from edgescope.export.tensorrt import EngineOptions, build_engine
from edgescope.export.triton import write_repository
from edgescope.export.validation import GateThresholds, compare, format_report
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.sources import open_source
from edgescope.signing import load_private_key, sign_bundle
from edgescope.v1 import manifest_pb2

Log = Callable[[str], None]
T = TypeVar("T")

_COLORS: dict[str, manifest_pb2.ColorMode.ValueType] = {
    "gray": manifest_pb2.COLOR_MODE_GRAY,
    "rgb": manifest_pb2.COLOR_MODE_RGB,
    "bgr": manifest_pb2.COLOR_MODE_BGR,
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
    color: str = "gray"
    resize: str = "stretch"
    scale: float = 1.0 / 255.0
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    # DICOM frames: "presentation" (modality LUT, VOI, MONOCHROME1 inverted), "modality" or "stored" values.
    intensity: str = "presentation"
    # The window or VOI LUT the model was trained with: an explanation, or a position; "" the frame's own.
    voi: str = ""
    labels: list[str] = field(default_factory=lambda: ["background", "lesion"])
    activation: str = "sigmoid"
    threshold: float = 0.5
    min_component_pixels: int = 0
    data: str = "synthetic:ultrasound"
    samples: int = 16
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    force: bool = False
    overwrite: bool = False
    opset: int = DEFAULT_OPSET
    input_name: str = "image"
    output_name: str = "logits"
    # Tasks beyond segmentation (export/tasks.py says which inputs and outputs each has).
    previous_frame_input: str = ""
    state: list[StateSpec] = field(default_factory=list)
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
        )


def _choice(value: str, options: Mapping[str, T], what: str) -> T:
    if value not in options:
        raise ConfigError(f"{what} {value!r} is not supported; choose one of: {', '.join(options)}")
    return options[value]


def build_manifest(request: ExportRequest) -> manifest_pb2.ModelManifest:
    """The manifest's model description (files and validation are added later)."""
    task = _choice(request.task, SUPPORTED_TASKS, "task")
    precision = _choice(request.precision, SUPPORTED_PRECISIONS, "precision")
    if request.input_height <= 0 or request.input_width <= 0:
        raise ConfigError(f"input size {request.input_height}x{request.input_width} must be positive")
    channels = 1 if request.color == "gray" else 3
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
            color=_choice(request.color, _COLORS, "color"),
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
        manifest_pb2.Dim(symbol="batch"),
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
    tasks.add_inputs(manifest, request)
    return manifest


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


def representative_inputs(data: str, samples: int, spec: manifest_pb2.Preprocessing) -> list[np.ndarray]:
    """Preprocessed frames from a source, exactly as the runtime would feed them."""
    if samples <= 0:
        raise ConfigError("validation needs at least one sample")
    inputs = []
    with open_source(data) as source:
        for frame in source:
            inputs.append(preprocess(frame.pixels, spec, frame.pixel_transform)[0])
            if len(inputs) == samples:
                break
    if not inputs:
        raise ExportError(f"validation source {data} yielded no frames")
    return inputs


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
    thresholds = gate_thresholds(request.precision, request.thresholds)
    # Read the key before minutes of export, so a wrong path fails first.
    signing_key = load_private_key(request.sign_key) if request.sign_key is not None else None
    log(f"edgescope export {request.name} -> {request.output}")
    with _step(log, "load PyTorch model"):
        model = tasks.for_task(
            load_model(request.factory, request.weights, request.torchscript, request.exported_program), request.task
        )
    with _step(log, f"read {request.samples} frames from {request.data}"):
        inputs = representative_inputs(request.data, request.samples, manifest.preprocessing)
    with staged_bundle(request.output, overwrite=request.overwrite) as staging:
        onnx_path = staging / ONNX_FILE
        with _step(log, f"export ONNX (opset {request.opset})"):
            proto = export_onnx(
                model,
                example_inputs(manifest, inputs[0]),
                onnx_path,
                input_name=tasks.input_names(request),
                output_name=tasks.output_names(request),
                opset=request.opset,
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
            _, reference = run_stream(torch_runner(model, manifest), manifest, inputs)
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            feeds, candidate = run_stream(onnx_runner(session), manifest, inputs)
            check_batch(session, feeds, candidate, request.thresholds.max_abs_error)
        if request.precision != "fp32":
            with _step(log, f"convert to {request.precision}"):
                settings = reduce_precision(
                    onnx_path, request.precision_options(), manifest.preprocessing, request.input_name
                )
                manifest.precision_settings.CopyFrom(settings)
            fp32_candidate = candidate
            with _step(log, f"run ONNX Runtime {request.precision}"):
                session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
                _, candidate = run_stream(onnx_runner(session), manifest, inputs)
            versus_fp32 = manifest_pb2.ValidationReport(
                reference=f"onnxruntime {ort.__version__} CPU fp32",
                candidate=f"onnxruntime {ort.__version__} CPU {request.precision}",
                samples=len(inputs),
                data_source=request.data,
                metrics=compare(fp32_candidate, candidate, manifest, thresholds),
            )
            versus_fp32.passed = all(m.passed for m in versus_fp32.metrics)
            log(format_report(versus_fp32))
            manifest.extra_validation.append(versus_fp32)
        report = manifest.validation
        report.reference = f"pytorch {torch.__version__}"
        report.candidate = f"onnxruntime {ort.__version__} CPU {request.precision}"
        report.samples = len(inputs)
        report.data_source = request.data
        report.metrics.extend(compare(reference, candidate, manifest, thresholds))
        report.passed = all(m.passed for m in report.metrics)
        report.forced = request.force and not report.passed
        log(format_report(report))
        if not report.passed and not request.force:
            raise ValidationFailedError(
                f"{request.name}: the ONNX model does not reproduce PyTorch within the thresholds; "
                "nothing was written (fix the model, relax the thresholds, "
                "or pass force to keep a bundle marked failed)"
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
        source_file = request.weights or request.torchscript or request.exported_program
        if source_file is not None:
            manifest.source_sha256 = sha256_file(source_file)
        manifest.model_source.CopyFrom(
            manifest_pb2.ModelSource(
                factory=request.factory or "",
                weights=str(request.weights.resolve()) if request.weights else "",
                torchscript=str(request.torchscript.resolve()) if request.torchscript else "",
            )
        )
        write_manifest(staging, manifest)
    bundle = load_bundle(request.output)
    bundle = _artifacts(bundle, request, log)
    if signing_key is not None:
        log(f"signed the manifest with key {sign_bundle(bundle.path, signing_key)[:16]} ({SIGNATURE_FILE})")
    log(f"wrote {request.output}: {', '.join(e.path for e in bundle.manifest.files)}, manifest.json")
    log(f"next: edgescope serve {request.output}    (re-check any time: edgescope validate {request.output})")
    return bundle


def _artifacts(bundle: Bundle, request: ExportRequest, log: Log) -> Bundle:
    """TensorRT engines and the Triton repository, built from the written bundle."""
    if request.engines is not False:
        try:
            with _step(log, "TensorRT engine"):
                build_engine(bundle, request.engine_options, log=log)
        except MissingDependencyError as exc:
            if request.engines:
                raise
            log(f"  no TensorRT engine: {exc}")
    if "triton" in request.formats:
        with _step(log, "Triton model repository"):
            write_repository(load_bundle(bundle.path))
    return load_bundle(bundle.path)
