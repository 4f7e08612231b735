"""FP32 ONNX -> FP16 or INT8 (Q/DQ) ONNX that ONNX Runtime runs on the CPU.

FP16 converts the graph's float tensors and weights, leaving numerically
sensitive op types in FP32 (reductions, normalisations, exponentials and the
ops ONNX Runtime has no FP16 kernel for); inputs and outputs stay FP32 so the
runtime feeds the same tensors whatever the precision. INT8 is static
quantization to Q/DQ nodes, calibrated on representative frames that go
through the runtime's own preprocessing, with weights in 7 bits when asked
(``reduce_range``: ONNX Runtime's integer kernels on x86 CPUs without VNNI
saturate on full-range weights). TensorRT 11 builds its engines from these
graphs (strong typing), so the precision the gate measured here is the
precision the engine runs.

A precision is never changed behind the user's back: INT8 without calibration
frames, or calibrated on the very frames that validate it, is refused.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import numpy.typing as npt
import onnx

from edgescope.errors import ConfigError, ExportError, SourceError
from edgescope.runtime.evaluation.limits import PRECISIONS
from edgescope.runtime.pipeline.decode import Pixels
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.sources import open_source
from edgescope.v1 import manifest_pb2

FP16_FP32_OPS: tuple[str, ...] = (
    # Reductions and normalisations: FP16 accumulation loses the small terms.
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    # Exponentials overflow FP16's range (max 65504) long before FP32's.
    "Softmax",
    "LogSoftmax",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Erf",
    # Coordinates: box decoding and resampling need FP32 resolution.
    "Resize",
    "RoiAlign",
    "NonMaxSuppression",
    "TopK",
    "Range",
    "CumSum",
)
"""Op types an FP16 graph keeps in FP32 by default (``--fp32-ops`` replaces the list)."""

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

Tensor = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class PrecisionOptions:
    """How to reach a precision; only the fields of the chosen precision matter."""

    precision: str = "fp32"
    fp32_ops: tuple[str, ...] = FP16_FP32_OPS
    calibration_data: str | None = None
    calibration_samples: int = 32
    calibration_method: str = "minmax"
    per_channel: bool = True
    # Weights in 7 bits, for x86 CPUs without VNNI (their integer kernels saturate on full-range INT8).
    reduce_range: bool = False


def check_options(options: PrecisionOptions, validation_data: str) -> None:
    """Refuse a precision request that cannot be met as asked, before any work is done."""
    if options.precision not in PRECISIONS:
        raise ConfigError(f"precision {options.precision!r} is not supported; choose one of: {', '.join(PRECISIONS)}")
    if options.precision != "int8":
        return
    if not options.calibration_data:
        raise ConfigError(
            "INT8 needs calibration frames and none were given: pass --calibration-data "
            "(dicom:PATH, video:PATH, synthetic:ultrasound?seed=N or a folder of images); "
            "edgescope does not fall back to another precision"
        )
    if options.calibration_data == validation_data:
        raise ConfigError(
            f"INT8 calibration and the accuracy gate would both use {validation_data}; the gate must measure "
            "frames the quantizer did not see: pass a different --calibration-data (another file, folder or seed)"
        )
    if options.calibration_samples <= 0:
        raise ConfigError("INT8 calibration needs at least one sample")
    if options.calibration_method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"calibration method {options.calibration_method!r} is not supported; "
            f"choose one of: {', '.join(CALIBRATION_METHODS)}"
        )


def _folder_frames(folder: Path) -> list[Pixels]:
    frames: list[Pixels] = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise SourceError(f"cannot read calibration image {path}")
        if image.ndim == 3:
            # OpenCV reads BGR(A); the runtime's pipeline takes RGB like every source.
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        frames.append(cast(Pixels, image))
    return frames


def calibration_inputs(spec: str, samples: int, preprocessing: manifest_pb2.Preprocessing) -> list[Tensor]:
    """Up to ``samples`` preprocessed frames from a source spec or a folder of images."""
    folder = Path(spec).expanduser()
    inputs: list[Tensor] = []
    if folder.is_dir():
        for image in _folder_frames(folder)[:samples]:
            inputs.append(preprocess(image, preprocessing)[0])
    else:
        with open_source(spec) as source:
            for frame in source:
                inputs.append(preprocess(frame.pixels, preprocessing, frame.pixel_transform)[0])
                if len(inputs) == samples:
                    break
    if not inputs:
        raise ExportError(f"calibration source {spec} yielded no frames")
    return inputs


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its producers (the FP16 converter appends its input casts last)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    produced = {o for n in graph.node for o in n.output}
    pending, ordered = list(graph.node), []
    while pending:
        # Names no node produces come from an outer scope or the graph's inputs.
        ready = [n for n in pending if all(i in available or i not in produced for i in n.input)]
        if not ready:
            raise ExportError("the FP16 graph has a cycle; it cannot be ordered")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def convert_fp16(model: onnx.ModelProto, fp32_ops: Sequence[str]) -> onnx.ModelProto:
    """An FP16 copy of ``model`` with ``fp32_ops`` (and ops lacking FP16 kernels) kept in FP32, FP32 I/O."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(fp32_ops))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        converted: onnx.ModelProto = convert_float_to_float16(copy, keep_io_types=True, op_block_list=blocked)
    except Exception as exc:  # the converter raises bare Exceptions and ValueErrors
        raise ExportError(f"FP16 conversion failed: {type(exc).__name__}: {exc}") from exc
    _sort_topologically(converted.graph)
    return converted


class _Frames:
    """onnxruntime's CalibrationDataReader protocol over a list of preprocessed frames."""

    def __init__(self, input_name: str, inputs: Sequence[Tensor]) -> None:
        self._feeds = iter([{input_name: x} for x in inputs])

    def get_next(self) -> dict[str, Tensor] | None:
        return next(self._feeds, None)


def quantize_int8(
    model: onnx.ModelProto, destination: Path, input_name: str, inputs: Sequence[Tensor], options: PrecisionOptions
) -> None:
    """Static INT8 quantization to a Q/DQ graph (signed INT8 activations and weights, as TensorRT takes them)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory(prefix="edgescope-int8-") as work:
        source = Path(work) / "fp32.onnx"
        onnx.save(model, str(source))
        try:
            # Shape inference and graph optimisation first, as onnxruntime's quantizer expects.
            quant_pre_process(str(source), str(source))
            quantize_static(
                source,
                destination,
                _Frames(input_name, inputs),
                quant_format=QuantFormat.QDQ,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[options.calibration_method],
                # TensorRT wants symmetric INT8 (zero point 0) for activations and weights.
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        except Exception as exc:  # the quantizer raises many kinds; name the cause
            raise ExportError(f"INT8 quantization failed: {type(exc).__name__}: {exc}") from exc


def reduce_precision(
    onnx_path: Path,
    options: PrecisionOptions,
    preprocessing: manifest_pb2.Preprocessing,
    input_name: str,
) -> manifest_pb2.PrecisionSettings:
    """Replace the FP32 graph at ``onnx_path`` by its ``options.precision`` version; say how it was made."""
    settings = manifest_pb2.PrecisionSettings(precision=PRECISIONS[options.precision])
    if options.precision == "fp32":
        return settings
    model = onnx.load(str(onnx_path))
    metadata = [(p.key, p.value) for p in model.metadata_props]
    if options.precision == "fp16":
        onnx.save(convert_fp16(model, options.fp32_ops), str(onnx_path))
        settings.fp32_op_types.extend(options.fp32_ops)
        settings.keep_io_types = True
    else:
        if options.calibration_data is None:
            raise ConfigError("INT8 needs calibration frames (--calibration-data)")
        inputs = calibration_inputs(options.calibration_data, options.calibration_samples, preprocessing)
        quantize_int8(model, onnx_path, input_name, inputs, options)
        settings.keep_io_types = True
        settings.calibration.CopyFrom(
            manifest_pb2.CalibrationInfo(
                data_source=options.calibration_data,
                samples=len(inputs),
                method=f"onnxruntime {options.calibration_method}",
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
            )
        )
    reduced = onnx.load(str(onnx_path))
    # The quantizer drops the model's metadata; provenance travels with the graph.
    del reduced.metadata_props[:]
    for key, value in [*metadata, ("edgescope.precision", options.precision)]:
        reduced.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(reduced)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the {options.precision} graph does not pass onnx.checker: {exc}") from exc
    onnx.save(reduced, str(onnx_path))
    return settings
