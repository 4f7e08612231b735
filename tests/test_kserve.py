"""The Open Inference Protocol endpoint, called with tritonclient itself."""

from __future__ import annotations

import queue
import shutil
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.server.registry import WorkerOptions
from edgescope.runtime.server.security import SecurityConfig
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


def test_model_config_describes_the_model_as_triton_does(client: Any, example_bundle: Bundle) -> None:
    from tritonclient.grpc import model_config_pb2

    config = client.get_model_config(MODEL, client_timeout=10).config
    manifest = example_bundle.manifest
    assert (config.name, config.platform, config.backend) == (MODEL, "onnxruntime_onnx", "onnxruntime")
    # The model batches, so the batch axis is implicit and max_batch_size is the server's limit.
    assert config.max_batch_size == WorkerOptions().max_batch
    assert [(t.name, list(t.dims)) for t in config.input] == [(manifest.inputs[0].name, [1, 256, 256])]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert config.input[0].format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert [(t.name, list(t.dims)) for t in config.output] == [
        (spec.name, [d.size for d in spec.shape[1:]]) for spec in manifest.outputs
    ]
    assert config.HasField("dynamic_batching")
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert config.parameters["sha256"].string_value == example_bundle.onnx_sha256
    assert client.get_model_config(MODEL, as_json=True, client_timeout=10)["config"]["name"] == MODEL
    with pytest.raises(InferenceServerException, match="not loaded") as missing:
        client.get_model_config("no-such-model", client_timeout=10)
    assert missing.value.status() == "StatusCode.NOT_FOUND"


def test_statistics_count_what_the_server_did(client: Any, example_bundle: Bundle) -> None:
    def figures() -> Any:
        (stats,) = client.get_inference_statistics(MODEL, client_timeout=10).model_stats
        return stats

    def batch_counts(stats: Any) -> dict[int, int]:
        return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}

    before = figures()
    client.infer(MODEL, [_input(example_bundle, np.concatenate([_frame_tensor(1), _frame_tensor(2)]))])
    client.infer(MODEL, [_input(example_bundle, _frame_tensor(3))])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [_input(example_bundle, np.zeros((1, 1, 8, 8), dtype=np.float32))])
    after = figures()

    assert (after.name, after.version) == (MODEL, example_bundle.manifest.version)
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 2
    stats, old = after.inference_stats, before.inference_stats
    assert stats.success.count - old.success.count == 2
    assert stats.fail.count - old.fail.count == 1
    assert stats.queue.count - old.queue.count == 2
    assert stats.compute_infer.ns > old.compute_infer.ns
    # A request's time covers its parts.
    spent = [stats.success.ns - old.success.ns]
    parts = [
        getattr(stats, f).ns - getattr(old, f).ns for f in ("queue", "compute_input", "compute_infer", "compute_output")
    ]
    assert spent[0] >= sum(parts) > 0
    grown = {size: count - batch_counts(before).get(size, 0) for size, count in batch_counts(after).items()}
    assert grown[1] == 1 and grown[2] == 1
    assert after.last_inference > 0
    every = client.get_inference_statistics(client_timeout=10).model_stats
    assert [s.name for s in every] == [MODEL]


def test_repository_index_and_admin_calls_without_a_repository(example_bundle: Bundle) -> None:
    bare = ServerThread([example_bundle.path])
    try:
        with grpcclient.InferenceServerClient(bare.target) as triton:
            index = triton.get_model_repository_index(client_timeout=10)
            assert [(m.name, m.state) for m in index.models] == [(MODEL, "READY")]
            with pytest.raises(InferenceServerException, match="--model-repository") as refused:
                triton.load_model(MODEL, client_timeout=10)
    finally:
        bare.stop()
    assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"


@pytest.fixture(scope="module")
def repository_server(example_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server that starts with no model: it loads them only through the repository calls."""
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(example_bundle.path, root / "ultrasound")
    running = ServerThread([], security=SecurityConfig(model_repository=root))
    try:
        yield running
    finally:
        running.stop()


def test_models_load_and_unload_through_the_repository(repository_server: ServerThread, example_bundle: Bundle) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def index(ready: bool = False) -> list[tuple[str, str, str]]:
        with grpc.insecure_channel(repository_server.target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            response = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=ready), timeout=10)
        return [(m.name, m.version, m.state) for m in response.models]

    with grpcclient.InferenceServerClient(repository_server.target) as triton:
        assert index() == [("ultrasound", "", "UNAVAILABLE")]
        assert index(ready=True) == []
        assert not triton.is_model_ready("ultrasound", client_timeout=10)

        triton.load_model("ultrasound", client_timeout=60)
        assert triton.is_model_ready("ultrasound", client_timeout=10)
        assert index(ready=True) == [("ultrasound", example_bundle.manifest.version, "READY")]
        tensor = _frame_tensor(4)
        output = example_bundle.manifest.outputs[0].name
        got = triton.infer("ultrasound", [_input(example_bundle, tensor)], client_timeout=60).as_numpy(output)
        np.testing.assert_allclose(got, _reference(example_bundle, tensor)[output], rtol=1e-5, atol=1e-5)
        # Loading a loaded model reloads it; it stays ready.
        triton.load_model("ultrasound", client_timeout=60)
        assert triton.is_model_ready("ultrasound", client_timeout=10)

        triton.unload_model("ultrasound", client_timeout=30)
        assert not triton.is_model_ready("ultrasound", client_timeout=10)
        assert index() == [("ultrasound", "", "UNAVAILABLE")]
        with pytest.raises(InferenceServerException) as gone:
            triton.infer("ultrasound", [_input(example_bundle, tensor)], client_timeout=30)
        assert gone.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (lambda t: t.load_model("no-such-model", client_timeout=30), "NOT_FOUND", "no bundle 'no-such-model'"),
        (lambda t: t.unload_model("no-such-model", client_timeout=30), "NOT_FOUND", "not loaded"),
        (lambda t: t.load_model("ultrasound", config="{}", client_timeout=30), "INVALID_ARGUMENT", "not supported"),
    ],
)
def test_repository_calls_refuse_what_they_cannot_do(
    repository_server: ServerThread, call: Any, status: str, message: str
) -> None:
    with (
        grpcclient.InferenceServerClient(repository_server.target) as triton,
        pytest.raises(InferenceServerException, match=message) as refused,
    ):
        call(triton)
    assert refused.value.status() == f"StatusCode.{status}"
