"""Fake-quant: a Q/DQ graph run in float, so its results do not depend on the CPU's integer kernels.

The proof is twofold: the graph ONNX Runtime executes holds no integer
kernel at all (only the elementwise QuantizeLinear/DequantizeLinear around
float convolutions), and its numbers are those of the ONNX Q/DQ definition
computed by hand in numpy. The inputs and weights are chosen at the top of
the INT8 range, where AVX2's pairwise 16-bit integer products saturate.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgescope.runtime.evaluation.runners import FAKE_QUANT, INTEGER, onnxruntime_runner, session_options
from edgescope.v1 import manifest_pb2

X_SCALE, Y_SCALE = 0.02, 0.5
CHANNELS_IN, CHANNELS_OUT = 8, 4
# Ops that run integer arithmetic on the CPU (fused Q/DQ groups and integer matmuls).
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul"}


def _weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    quantized = rng.integers(100, 128, size=(CHANNELS_OUT, CHANNELS_IN, 3, 3)).astype(np.int8)
    quantized[1] *= -1  # one channel negative, so outputs cover both signs
    scales = np.array([0.01, 0.02, 0.005, 0.015], np.float32)
    return quantized, scales


def _qdq_conv(path: Path) -> Path:
    """x -> Q -> DQ -> Conv(DQ(w int8, per channel)) -> Q -> DQ -> y, symmetric INT8 as TensorRT takes it."""
    weights, scales = _weights()
    zero = np.zeros((), np.int8)
    initializers = [
        numpy_helper.from_array(np.array(X_SCALE, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(Y_SCALE, np.float32), "y_scale"),
        numpy_helper.from_array(zero, "zero"),
        numpy_helper.from_array(weights, "w_q"),
        numpy_helper.from_array(scales, "w_scale"),
        numpy_helper.from_array(np.zeros(CHANNELS_OUT, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "zero"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS_IN, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS_OUT, 16, 16])],
        initializers,
    )
    # IR 9 (ONNX 1.14): what every ONNX Runtime this project supports reads, Python 3.10's included.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _quantize(values: np.ndarray, scale: float) -> np.ndarray:
    # ONNX QuantizeLinear: round half to even, saturate to int8.
    return np.clip(np.rint(values / scale), -128, 127)


def _by_hand(x: np.ndarray) -> np.ndarray:
    """The Q/DQ definition in float64: what every fake-quant runner must compute."""
    weights, scales = _weights()
    x_dq = _quantize(x.astype(np.float64), X_SCALE) * X_SCALE
    w_dq = weights.astype(np.float64) * scales[:, None, None, None].astype(np.float64)
    padded = np.pad(x_dq[0], ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((CHANNELS_OUT, 16, 16))
    for dy in range(3):
        for dx in range(3):
            window = padded[:, dy : dy + 16, dx : dx + 16]
            out += np.einsum("oc,chw->ohw", w_dq[:, :, dy, dx], window)
    return (_quantize(out, Y_SCALE) * Y_SCALE)[None].astype(np.float32)


def _executed_ops(model: Path, options: ort.SessionOptions, tmp_path: Path) -> Counter[str]:
    options.optimized_model_filepath = str(tmp_path / "executed.onnx")
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(str(tmp_path / "executed.onnx")).graph.node)


def test_fake_quant_executes_no_integer_kernel(tmp_path: Path) -> None:
    model = _qdq_conv(tmp_path / "qdq.onnx")
    fake = _executed_ops(model, session_options(FAKE_QUANT), tmp_path)
    assert fake["Conv"] == 1 and fake["QuantizeLinear"] == 2
    assert not set(fake) & INTEGER_OPS, fake
    # The contrast: with every optimisation the same graph becomes an integer convolution.
    assert set(_executed_ops(model, session_options(INTEGER), tmp_path)) & INTEGER_OPS


def test_fake_quant_computes_the_qdq_definition_in_float(tmp_path: Path) -> None:
    model = _qdq_conv(tmp_path / "qdq.onnx")
    runner = onnxruntime_runner(model, manifest_pb2.PRECISION_INT8)
    assert runner.info.quant_execution == FAKE_QUANT
    # Activations at the top of the INT8 range (quantized 120..127) against weights of 100..127.
    x = np.random.default_rng(5).uniform(2.4, 2.54, size=(1, CHANNELS_IN, 16, 16)).astype(np.float32)
    got = runner.infer({"x": x})["y"]
    expected = _by_hand(x)
    # Float32 sums may land a rounding tie on the other side: at most one output quantum, rarely.
    difference = np.abs(got - expected)
    assert difference.max() <= Y_SCALE + 1e-6
    assert np.mean(difference > 0) < 0.01
    assert np.abs(expected).max() > 100 * Y_SCALE  # large sums: where integer kernels would saturate


def test_a_float_graph_runs_with_every_optimisation(tmp_path: Path) -> None:
    model = _qdq_conv(tmp_path / "qdq.onnx")
    runner = onnxruntime_runner(model, manifest_pb2.PRECISION_FP32, quant=FAKE_QUANT)
    assert runner.info.quant_execution == manifest_pb2.QUANT_EXECUTION_NONE
