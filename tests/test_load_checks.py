"""What a server checks before it serves a model, and what it says about it afterwards.

Every bundle runs its golden frames through the very session that will serve
it, on this device: the verdict is in GetModel, the metrics and each result's
provenance; a bundle whose numbers do not come out is not served, and health
says so for that model while the others serve.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import numpy_helper

from edgescope.bundle import MANIFEST_FILE, Bundle, load_bundle, write_manifest
from edgescope.errors import SelfTestFailedError
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.server.registry import ModelRegistry
from edgescope.runtime.telemetry.metrics import TelemetryConfig
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

FRAME = encode_raw((np.random.default_rng(2).random((120, 160)) * 255).astype(np.uint8))


def _tampered(bundle: Bundle, folder: Path, name: str) -> Path:
    """The bundle with its graph's weights altered and every hash re-computed: it loads, but computes wrongly."""
    copy = Path(shutil.copytree(bundle.path, folder / name))
    graph = onnx.load(str(copy / "model.onnx"))
    for initializer in graph.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.dtype == np.float32 and weights.size > 16:
            initializer.CopyFrom(numpy_helper.from_array(-weights, initializer.name))
    onnx.save(graph, str(copy / "model.onnx"))
    manifest = load_bundle(copy, verify=False).manifest
    manifest.name = name
    write_manifest(copy, manifest)
    load_bundle(copy)  # every file matches its (new) hash
    return copy


def test_a_tampered_rehashed_graph_fails_its_self_test_and_is_not_served(
    example_bundle: Bundle, tmp_path: Path
) -> None:
    tampered = _tampered(example_bundle, tmp_path, "tampered")
    registry = ModelRegistry(OnnxRuntimeBackend(intra_op_threads=1))
    try:
        with pytest.raises(SelfTestFailedError, match="did not reproduce its golden frames") as refused:
            registry.load(tampered)
        assert "dice" in str(refused.value)
        assert registry.names() == [] and "tampered" in registry.failed()
    finally:
        registry.close()


def test_a_model_that_fails_its_self_test_is_not_serving_while_the_others_serve(
    example_bundle: Bundle, tmp_path: Path
) -> None:
    tampered = _tampered(example_bundle, tmp_path, "tampered")
    running = ServerThread([example_bundle.path, tampered])
    try:
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

            assert status("edgescope.model.tampered") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert status("edgescope.model.lesion-unet") == health_pb2.HealthCheckResponse.SERVING
            assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING  # not all it was told to serve
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            models = {m.name: m for m in stub.ListModels(stream_pb2.ListModelsRequest(), timeout=10).models}
            assert not models["tampered"].ready and "golden frames" in models["tampered"].not_ready_reason
            assert models["lesion-unet"].ready
            with pytest.raises(grpc.RpcError) as missing:
                stub.Infer(stream_pb2.Frame(stream_id="t", model="tampered", raw=FRAME), timeout=30)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert "not served" in (missing.value.details() or "")
            ok = stub.Infer(stream_pb2.Frame(stream_id="t", model="lesion-unet", raw=FRAME), timeout=30)
            assert ok.status.code == stream_pb2.FRAME_STATUS_CODE_OK
    finally:
        running.stop()


def test_the_verdict_is_in_get_model_the_metrics_and_every_result(example_bundle: Bundle) -> None:
    running = ServerThread([example_bundle.path], telemetry=TelemetryConfig(http_port=0))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            info = stub.GetModel(stream_pb2.GetModelRequest(name="lesion-unet"), timeout=10)
            result = stub.Infer(stream_pb2.Frame(stream_id="t", model="lesion-unet", raw=FRAME), timeout=30)
        assert running.running.telemetry is not None and running.running.telemetry.http_port is not None
        url = f"http://127.0.0.1:{running.running.telemetry.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            scrape = response.read().decode()
    finally:
        running.stop()
    report = info.self_test
    assert report.passed and report.frames == example_bundle.manifest.golden.frames
    assert report.runner.kind == "onnxruntime" and report.runner.artifact_sha256 == example_bundle.onnx_sha256
    assert report.machine.architecture and report.machine.isa_level
    assert info.provenance.self_test == result.provenance.self_test
    assert result.provenance.self_test.startswith(f"passed: {report.frames} golden frames on onnxruntime")
    assert not result.provenance.self_test_skipped
    assert 'edgescope_model_self_test_passed{model="lesion-unet",runner="onnxruntime"} 1.0' in scrape


def test_skipping_the_self_test_is_said_on_every_result(example_bundle: Bundle) -> None:
    running = ServerThread([example_bundle.path], self_test=False)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            frames = [stream_pb2.Frame(stream_id="s", seq=seq, model="lesion-unet", raw=FRAME) for seq in range(3)]
            results = list(stub.Stream(iter(frames), timeout=60))
            info = stub.GetModel(stream_pb2.GetModelRequest(name="lesion-unet"), timeout=10)
    finally:
        running.stop()
    assert all(r.provenance.self_test_skipped and "skipped" in r.provenance.self_test for r in results)
    assert not info.HasField("self_test")


def test_a_bundle_without_golden_frames_is_not_served(example_bundle: Bundle, tmp_path: Path) -> None:
    # An export from before golden frames existed: the manifest names none, the file is gone.
    old = Path(shutil.copytree(example_bundle.path, tmp_path / "old"))
    (old / "golden.npz").unlink()
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    manifest.pop("golden", None)
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    bundle = load_bundle(old, verify=False)
    write_manifest(old, bundle.manifest)
    registry = ModelRegistry(OnnxRuntimeBackend(intra_op_threads=1))
    try:
        with pytest.raises(SelfTestFailedError, match="golden"):
            registry.load(old)
    finally:
        registry.close()
