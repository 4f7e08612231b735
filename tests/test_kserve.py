"""The Open Inference Protocol endpoint, called with tritonclient itself."""

from __future__ import annotations

import queue
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.transport import channel_options

from .conftest import ServerThread

grpcclient = pytest.importorskip("tritonclient.grpc")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

MODEL = "lesion-unet"


def _frame_tensor(seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).random((1, 1, 256, 256), dtype=np.float32)


def _reference(bundle: Bundle, tensor: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: tensor}), strict=True))


def _input(bundle: Bundle, tensor: npt.NDArray[Any], datatype: str = "FP32") -> Any:
    tensor_input = grpcclient.InferInput(bundle.manifest.inputs[0].name, list(tensor.shape), datatype)
    tensor_input.set_data_from_numpy(tensor)
    return tensor_input


@pytest.fixture
def client(server: ServerThread) -> Any:
    with grpcclient.InferenceServerClient(server.target) as triton:
        yield triton


def test_health_and_metadata(client: Any, example_bundle: Bundle) -> None:
    assert client.is_server_live(client_timeout=10)
    assert client.is_server_ready(client_timeout=10)
    assert client.is_model_ready(MODEL, client_timeout=10)
    assert not client.is_model_ready("no-such-model", client_timeout=10)
    assert client.get_server_metadata(client_timeout=10).name == "edgescope"

    metadata = client.get_model_metadata(MODEL, client_timeout=10)
    manifest = example_bundle.manifest
    assert metadata.name == MODEL and list(metadata.versions) == [manifest.version]
    assert [(t.name, t.datatype) for t in metadata.inputs] == [(manifest.inputs[0].name, "FP32")]
    # The batch dimension is dynamic; the image size is fixed by the export.
    assert list(metadata.inputs[0].shape) == [-1, 1, 256, 256]
    assert [t.name for t in metadata.outputs] == [o.name for o in manifest.outputs]
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.get_model_metadata("no-such-model", client_timeout=10)


def test_infer_matches_onnxruntime_on_the_same_input(client: Any, example_bundle: Bundle) -> None:
    tensor = _frame_tensor(3)
    output_name = example_bundle.manifest.outputs[0].name
    result = client.infer(
        MODEL,
        [_input(example_bundle, tensor)],
        outputs=[grpcclient.InferRequestedOutput(output_name)],
        request_id="r1",
        client_timeout=60,
    )
    got = result.as_numpy(output_name)
    expected = _reference(example_bundle, tensor)[output_name]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert result.get_response().id == "r1"


def test_infer_with_typed_contents_and_a_batch_of_two(server: ServerThread, example_bundle: Bundle) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    tensor = np.concatenate([_frame_tensor(5), _frame_tensor(6)])
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    typed = request.inputs.add(name=example_bundle.manifest.inputs[0].name, datatype="FP32", shape=tensor.shape)
    typed.contents.fp32_contents.extend(tensor.ravel().tolist())
    with grpc.insecure_channel(server.target, options=channel_options(64 * 1024 * 1024)) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    output = response.outputs[0]
    values = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(output.shape)
    expected = _reference(example_bundle, tensor)[output.name]
    assert output.shape == [2, *expected.shape[1:]]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("tensor", "datatype", "message"),
    [
        (np.zeros((1, 1, 128, 128), dtype=np.float32), "FP32", "must have shape"),
        (np.zeros((1, 1, 256, 256), dtype=np.float64), "FP64", "must be FP32"),
        (np.zeros((1, 256, 256), dtype=np.float32), "FP32", "must have shape"),
    ],
)
def test_bad_inputs_are_invalid_argument(
    client: Any, example_bundle: Bundle, tensor: npt.NDArray[Any], datatype: str, message: str
) -> None:
    with pytest.raises(InferenceServerException, match=message) as raised:
        client.infer(MODEL, [_input(example_bundle, tensor, datatype)], client_timeout=30)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_unknown_model_and_output_fail(client: Any, example_bundle: Bundle) -> None:
    with pytest.raises(InferenceServerException, match="no-such-model") as missing:
        client.infer("no-such-model", [_input(example_bundle, _frame_tensor(0))], client_timeout=30)
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="no output"):
        client.infer(
            MODEL,
            [_input(example_bundle, _frame_tensor(0))],
            outputs=[grpcclient.InferRequestedOutput("nope")],
            client_timeout=30,
        )


def test_stream_infer_answers_each_request_and_survives_a_bad_one(client: Any, example_bundle: Bundle) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=120)
    try:
        tensors = {f"s{i}": _frame_tensor(10 + i) for i in range(3)}
        client.async_stream_infer(MODEL, [_input(example_bundle, tensors["s0"])], request_id="s0")
        client.async_stream_infer(
            MODEL, [_input(example_bundle, np.zeros((1, 1, 8, 8), dtype=np.float32))], request_id="bad"
        )
        for request_id in ("s1", "s2"):
            client.async_stream_infer(MODEL, [_input(example_bundle, tensors[request_id])], request_id=request_id)
        received = [answers.get(timeout=60) for _ in range(4)]
    finally:
        client.stop_stream()

    output_name = example_bundle.manifest.outputs[0].name
    ok = [result for result, error in received if error is None]
    errors = [error for result, error in received if error is not None]
    assert len(ok) == 3 and len(errors) == 1
    assert "must have shape" in str(errors[0])
    # Answers come in request order, each matching onnxruntime on its own input.
    assert [result.get_response().id for result in ok] == ["s0", "s1", "s2"]
    for result in ok:
        expected = _reference(example_bundle, tensors[result.get_response().id])[output_name]
        np.testing.assert_allclose(result.as_numpy(output_name), expected, rtol=1e-5, atol=1e-5)
