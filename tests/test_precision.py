"""FP16 and INT8 bundles of the example U-Net: built, gated, self-tested, run in ONNX Runtime on the CPU; refusals.

The INT8 graph is gated as fake-quant, which gives the same answer on every
CPU; nothing here asserts a figure that depends on the instruction set. The
integer-kernel path is checked for consistency: its self-test passes exactly
when its outputs reproduce the gate, on whatever CPU runs the test.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgescope.bundle import Bundle
from edgescope.errors import ConfigError, ValidationFailedError
from edgescope.export.precision import FP16_FP32_OPS, calibration_inputs, convert_fp16
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.evaluation import (
    FAKE_QUANT,
    INTEGER,
    PRECISION_THRESHOLDS,
    onnxruntime_runner,
    onnxruntime_self_test,
    read_golden,
)
from edgescope.runtime.evaluation.metrics import dice
from edgescope.runtime.evaluation.runners import run_stream
from edgescope.runtime.pipeline.postprocess import segmentation_mask
from edgescope.runtime.sources import open_source
from edgescope.v1 import manifest_pb2

from .conftest import EXAMPLE

torch = pytest.importorskip("torch")

from edgescope.export import ExportRequest, export_model  # noqa: E402


def _request(out: Path, **changes: object) -> ExportRequest:
    request = ExportRequest(
        name="lesion-unet",
        output=out,
        factory=str(EXAMPLE / "model.py") + ":build",
        weights=EXAMPLE / "weights.pt",
        samples=4,
        engines=False,
    )
    for key, value in changes.items():
        setattr(request, key, value)
    return request


# The gate runs on its precision's default number of frames (48): what a user gets.
@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    request = _request(tmp_path_factory.mktemp("fp16") / "b", precision="fp16", samples=None)
    return export_model(request, log=lambda _: None)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    request = _request(
        tmp_path_factory.mktemp("int8") / "b",
        precision="int8",
        samples=None,
        calibration_data="synthetic:ultrasound?seed=11",
    )
    return export_model(request, log=lambda _: None)


@pytest.fixture(scope="module")
def int8_reduced_range_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    request = _request(
        tmp_path_factory.mktemp("int8rr") / "b",
        precision="int8",
        samples=8,
        calibration_data="synthetic:ultrasound?seed=11",
        reduce_range=True,
    )
    return export_model(request, log=lambda _: None)


def _metrics(report: manifest_pb2.ValidationReport) -> dict[str, float]:
    return {m.name: m.value for m in report.metrics}


def _frames(count: int, bundle: Bundle) -> list[np.ndarray]:
    return calibration_inputs("synthetic:ultrasound?seed=99", count, bundle.manifest.preprocessing)


def test_fp16_bundle_holds_an_fp16_graph_with_fp32_io(fp16_bundle: Bundle) -> None:
    manifest = fp16_bundle.manifest
    assert manifest.precision == manifest_pb2.PRECISION_FP16
    assert manifest.precision_settings.keep_io_types
    assert "Softmax" in manifest.precision_settings.fp32_op_types
    graph = onnx.load(str(fp16_bundle.onnx_path)).graph
    weights = Counter(t.data_type for t in graph.initializer)
    assert weights[onnx.TensorProto.FLOAT16] > weights[onnx.TensorProto.FLOAT]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    onnx.checker.check_model(onnx.load(str(fp16_bundle.onnx_path)))


def test_int8_bundle_holds_a_qdq_graph_with_its_calibration(int8_bundle: Bundle) -> None:
    manifest = int8_bundle.manifest
    assert manifest.precision == manifest_pb2.PRECISION_INT8
    calibration = manifest.precision_settings.calibration
    assert calibration.data_source == "synthetic:ultrasound?seed=11" and calibration.samples == 32
    model = onnx.load(str(int8_bundle.onnx_path))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    # TensorRT takes symmetric INT8 only: every zero point is 0.
    zero_points = [i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input[2:3]]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert zero_points and all(not initializers[z].any() for z in zero_points)
    assert {p.key: p.value for p in model.metadata_props}["edgescope.precision"] == "int8"


@pytest.mark.parametrize("which", ["fp16_bundle", "int8_bundle"])
def test_reduced_precision_passes_its_gate_against_pytorch_and_fp32(which: str, request: pytest.FixtureRequest) -> None:
    bundle: Bundle = request.getfixturevalue(which)
    precision = which.removesuffix("_bundle")
    main, (versus_fp32,) = bundle.manifest.validation, bundle.manifest.extra_validation
    assert main.passed and versus_fp32.passed
    assert main.samples == 48 and main.reference_runner.kind == "pytorch"
    assert main.candidate_runner.precision == bundle.manifest.precision
    assert versus_fp32.reference_runner.precision == manifest_pb2.PRECISION_FP32
    limits = PRECISION_THRESHOLDS[precision]
    metrics = {m.name: m for m in main.metrics}
    # A floor for every frame as well as a mean.
    assert metrics["dice_min"].per_frame and metrics["dice_min"].threshold == limits.min_frame_dice
    assert metrics["dice_min"].frames_failed == 0 and metrics["dice_mean"].value >= limits.min_dice
    # Reduced precision really changed the numbers (an FP32 graph would be within 1e-4).
    assert {m.name: m.value for m in versus_fp32.metrics}["max_abs_error"] > 1e-3


def test_int8_is_gated_as_fake_quant_and_the_report_says_so(int8_bundle: Bundle) -> None:
    report = int8_bundle.manifest.validation
    assert report.candidate_runner.quant_execution == FAKE_QUANT
    assert report.candidate.endswith("cpu int8 fake-quant")
    assert report.machine.architecture and report.machine.cpu is not None
    golden = int8_bundle.manifest.golden
    assert golden.gated_runner.quant_execution == FAKE_QUANT and golden.limits.min_dice == 0.95
    assert read_golden(int8_bundle).gated is not None
    fake_quant = onnxruntime_self_test(int8_bundle)
    assert fake_quant.passed, fake_quant.reasons
    assert fake_quant.versus_gated.passed


def test_int8_on_frames_with_small_lesions_is_refused_per_frame(tmp_path: Path) -> None:
    # Held-out frames with lesions of a few pixels: INT8 loses some of them (Dice < 0.9 on a
    # quarter of the frames), which a mean alone or a gate of a few frames would hide.
    request = _request(
        tmp_path / "b",
        precision="int8",
        samples=None,
        data="synthetic:ultrasound?seed=202",
        calibration_data="synthetic:ultrasound?seed=101",
    )
    with pytest.raises(ValidationFailedError, match=r"dice_min: \d+ of 48 frames below 0\.9") as refused:
        export_model(request, log=lambda _: None)
    assert "nothing was written" in str(refused.value)
    assert not (tmp_path / "b").exists()


def test_reduced_range_keeps_weights_in_7_bits_and_says_so(int8_reduced_range_bundle: Bundle) -> None:
    assert int8_reduced_range_bundle.manifest.precision_settings.calibration.reduce_range
    model = onnx.load(str(int8_reduced_range_bundle.onnx_path))
    weights = [
        onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.dims
    ]
    assert weights and all(int(np.abs(w.astype(np.int16)).max()) <= 64 for w in weights)
    assert onnxruntime_self_test(int8_reduced_range_bundle).passed


@pytest.mark.parametrize("which", ["int8_bundle", "int8_reduced_range_bundle"])
def test_integer_kernels_pass_their_self_test_exactly_when_they_reproduce_the_gate(
    which: str, request: pytest.FixtureRequest
) -> None:
    int8_bundle: Bundle = request.getfixturevalue(which)
    report = onnxruntime_self_test(int8_bundle, quant=INTEGER)
    assert report.runner.quant_execution == INTEGER
    # The same verdict, computed here by hand from the golden frames and this CPU's integer kernels.
    golden = read_golden(int8_bundle)
    assert golden.gated is not None
    manifest = int8_bundle.manifest
    params = manifest.postprocessing.segmentation
    runner = onnxruntime_runner(int8_bundle.onnx_path, manifest.precision, quant=INTEGER)
    _, outputs = run_stream(runner.infer, manifest, golden.inputs)
    masks = [segmentation_mask(o["logits"], params) for o in outputs]

    def dices(stored: list[Outputs]) -> list[float]:
        return [dice(m, segmentation_mask(s["logits"], params)) for m, s in zip(masks, stored, strict=True)]

    versus_reference, versus_gated = dices(golden.reference), dices(golden.gated)
    limits = PRECISION_THRESHOLDS["int8"]
    reproduces = (
        min(versus_reference) >= limits.min_frame_dice
        and min(versus_gated) >= limits.min_frame_dice
        and float(np.mean(versus_gated)) >= limits.min_dice
    )
    assert report.passed is reproduces
    if not report.passed:
        assert report.reasons and all("dice" in reason for reason in report.reasons)


@pytest.mark.parametrize("which", ["fp16_bundle", "int8_bundle"])
def test_reduced_precision_runs_batches_in_onnxruntime_cpu(which: str, request: pytest.FixtureRequest) -> None:
    bundle: Bundle = request.getfixturevalue(which)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    frames = _frames(3, bundle)
    (batched,) = session.run(None, {"image": np.concatenate(frames)})
    assert batched.dtype == np.float32 and batched.shape == (3, 1, 256, 256)
    single = np.concatenate([session.run(None, {"image": x})[0] for x in frames])
    assert np.allclose(batched, single, atol=0.05)


@pytest.mark.parametrize("which", ["int8_bundle", "int8_reduced_range_bundle"])
def test_the_server_serves_integer_kernels_only_when_they_pass_the_self_test(
    which: str, request: pytest.FixtureRequest
) -> None:
    from edgescope.errors import SelfTestFailedError
    from edgescope.runtime.backends.onnxruntime import FAKE_QUANT, OnnxRuntimeBackend
    from edgescope.runtime.server.registry import ModelRegistry

    int8_bundle: Bundle = request.getfixturevalue(which)
    # The verdict the test above checks against a hand-computed one.
    expected = onnxruntime_self_test(int8_bundle, quant=INTEGER)
    integer = ModelRegistry(OnnxRuntimeBackend(intra_op_threads=1))
    try:
        if expected.passed:
            served = integer.load(int8_bundle.path)
            assert served.self_test is not None and served.self_test.passed
            assert served.provenance.self_test.startswith("passed") and "integer kernels" in served.provenance.self_test
        else:
            with pytest.raises(SelfTestFailedError, match="did not reproduce its golden frames") as refused:
                integer.load(int8_bundle.path)
            assert all(reason in str(refused.value) for reason in expected.reasons)
            assert "x86" in str(refused.value) or "aarch64" in str(refused.value)  # the machine is named
            assert integer.names() == [] and int8_bundle.manifest.name in integer.failed()
    finally:
        integer.close()
    # As fake-quant, what the gate accepted, it is served on any CPU.
    fake = ModelRegistry(OnnxRuntimeBackend(intra_op_threads=1, int8_execution=FAKE_QUANT))
    try:
        assert "fake-quant" in fake.load(int8_bundle.path).provenance.self_test
    finally:
        fake.close()


def test_reduced_precision_bundles_are_served(fp16_bundle: Bundle) -> None:
    from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgescope.runtime.server.registry import ModelRegistry

    registry = ModelRegistry(OnnxRuntimeBackend())
    try:
        registry.load(fp16_bundle.path)
    finally:
        registry.close()


def test_int8_without_calibration_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="INT8 needs calibration frames"):
        export_model(_request(tmp_path / "b", precision="int8"), log=lambda _: None)
    assert not (tmp_path / "b").exists()


def test_int8_calibrated_on_the_gate_frames_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did not see"):
        export_model(
            _request(tmp_path / "b", precision="int8", calibration_data="synthetic:ultrasound"), log=lambda _: None
        )


def test_unknown_calibration_method_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kl-divergence"):
        export_model(
            _request(
                tmp_path / "b",
                precision="int8",
                calibration_data="synthetic:ultrasound?seed=2",
                calibration_method="kl-divergence",
            ),
            log=lambda _: None,
        )


def test_calibration_from_a_folder_of_images(tmp_path: Path, fp16_bundle: Bundle) -> None:
    with open_source("synthetic:ultrasound?seed=4&frames=3") as source:
        for index, frame in enumerate(source):
            cv2.imwrite(str(tmp_path / f"{index}.png"), frame.pixels)
    (tmp_path / "notes.txt").write_text("not an image")
    inputs = calibration_inputs(str(tmp_path), 10, fp16_bundle.manifest.preprocessing)
    assert len(inputs) == 3 and inputs[0].shape == (1, 1, 256, 256)
    assert float(inputs[0].min()) >= 0.0 and float(inputs[0].max()) <= 1.0


def _softmax_input_type(model: onnx.ModelProto) -> int:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    for node in graph.node:
        if node.op_type == "Cast":
            types[node.output[0]] = int(onnx.helper.get_attribute_value(node.attribute[0]))
    (softmax,) = [n for n in graph.node if n.op_type == "Softmax"]
    return types[softmax.input[0]]


def test_fp32_ops_are_configurable() -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["r"]), onnx.helper.make_node("Softmax", ["r"], ["y"], axis=1)],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    assert _softmax_input_type(convert_fp16(model, FP16_FP32_OPS)) == onnx.TensorProto.FLOAT
    assert _softmax_input_type(convert_fp16(model, ())) == onnx.TensorProto.FLOAT16
