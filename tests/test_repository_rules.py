"""LoadModel cannot be fooled: inconsistent manifests, entries named after another model, failed loads."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgescope.bundle import Bundle
from edgescope.errors import BundleError
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.server.registry import ModelRegistry
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread


@pytest.fixture
def entry(example_bundle: Bundle) -> Iterator[Callable[[str, Callable[[dict[str, object]], None]], Path]]:
    """Make a repository entry beside the served bundle: a copy of it, its manifest edited."""
    made: list[Path] = []

    def make(name: str, edit: Callable[[dict[str, object]], None]) -> Path:
        path = example_bundle.path.parent / name
        shutil.copytree(example_bundle.path, path)
        manifest = json.loads((path / "manifest.json").read_text())
        edit(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path)


def _names(stub: stream_pb2_grpc.StreamServiceStub) -> dict[str, bool]:
    return {m.name: m.ready for m in stub.ListModels(stream_pb2.ListModelsRequest(), timeout=10).models}


def _load_error(stub: stream_pb2_grpc.StreamServiceStub, bundle: str, name: str = "") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        stub.LoadModel(stream_pb2.LoadModelRequest(bundle=bundle, name=name), timeout=60)
    return raised.value


def test_an_inconsistent_manifest_is_refused_and_leaves_nothing_behind(server: ServerThread, entry: Callable) -> None:
    def five_means(manifest: dict[str, object]) -> None:
        manifest["name"] = "five-means"
        pre = manifest["preprocessing"]
        assert isinstance(pre, dict)
        pre["mean"], pre["std"] = [0.5] * 5, [0.25] * 5

    def no_height(manifest: dict[str, object]) -> None:
        manifest["name"] = "no-height"
        pre = manifest["preprocessing"]
        assert isinstance(pre, dict)
        pre["height"] = 0

    entry("five-means", five_means)
    entry("no-height", no_height)
    with grpc.insecure_channel(server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        before = _names(stub)
        for bundle, phrase in (("five-means", "5 mean values for a 1-channel input"), ("no-height", "input size")):
            error = _load_error(stub, bundle)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "inconsistent" in (error.details() or "") and phrase in (error.details() or "")
        assert _names(stub) == before
        with pytest.raises(grpc.RpcError) as raised:
            stub.UnloadModel(stream_pb2.UnloadModelRequest(name="no-height"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_entry_cannot_stand_in_for_the_model_its_manifest_names(server: ServerThread, entry: Callable) -> None:
    entry("bm", lambda manifest: manifest.update(version="evil"))  # its manifest says lesion-unet
    with grpc.insecure_channel(server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        error = _load_error(stub, "bm")
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "holds a model named" in (error.details() or "")
        served = stub.GetModel(stream_pb2.GetModelRequest(name="lesion-unet"), timeout=10)
        assert served.manifest.version != "evil"
        # Asked for by name, it is served under that name, beside the model it copies.
        info = stub.LoadModel(stream_pb2.LoadModelRequest(bundle="bm", name="bm"), timeout=60)
        assert info.name == "bm" and info.manifest.version == "evil"
        assert stub.GetModel(stream_pb2.GetModelRequest(name="lesion-unet"), timeout=10).manifest.version != "evil"
        stub.UnloadModel(stream_pb2.UnloadModelRequest(name="bm"), timeout=10)


def test_a_model_that_failed_at_start_is_listed_until_unloaded(tmp_path: Path, example_bundle: Bundle) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(example_bundle.path, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["name"], manifest["preprocessing"]["std"] = "broken", [0.0]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    registry = ModelRegistry(OnnxRuntimeBackend(intra_op_threads=1, spinning="off"))
    try:
        with pytest.raises(BundleError, match="std value is 0"):
            registry.load(broken)
        assert "broken" in registry.failed()
        registry.unload("broken")
        assert registry.failed() == {}
    finally:
        registry.close()


def test_an_unloaded_model_stops_answering_serving_on_its_health_name(
    server: ServerThread, example_bundle: Bundle
) -> None:
    name = "edgescope.model.second"
    with grpc.insecure_channel(server.target) as channel:
        stub, health = stream_pb2_grpc.StreamServiceStub(channel), health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            deadline = time.monotonic() + 5
            while True:  # the board publishes on the server's loop, just after the change
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                if reply.status == expected or time.monotonic() > deadline:
                    return reply.status
                time.sleep(0.05)

        stub.LoadModel(stream_pb2.LoadModelRequest(bundle=example_bundle.path.name, name="second"), timeout=60)
        expected = health_pb2.HealthCheckResponse.SERVING
        assert status() == expected
        stub.UnloadModel(stream_pb2.UnloadModelRequest(name="second"), timeout=10)
        expected = health_pb2.HealthCheckResponse.NOT_SERVING
        assert status() == expected
