"""The Triton model repository: config.pbtxt parsed by tritonclient's own ModelConfig."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format

from edgescope.bundle import Bundle, load_bundle, write_manifest
from edgescope.engines import DeviceFacts, EngineKey, write_sidecar
from edgescope.errors import ConfigError
from edgescope.export.triton import TritonOptions, write_repository
from edgescope.v1 import manifest_pb2

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture
def bundle_copy(example_bundle: Bundle, tmp_path: Path) -> Bundle:
    shutil.copytree(example_bundle.path, tmp_path / "b")
    return load_bundle(tmp_path / "b")


def _parse(path: Path) -> object:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def test_onnx_model_config_parses_and_matches_the_manifest(bundle_copy: Bundle) -> None:
    (config_path,) = write_repository(bundle_copy, TritonOptions(max_batch_size=16, instances=2, gpus=(0,)))
    config = _parse(config_path)
    assert config.name == "lesion-unet" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    (image,) = config.input
    assert image.name == "image" and list(image.dims) == [1, 256, 256]
    assert image.data_type == model_config_pb2.TYPE_FP32
    (logits,) = config.output
    assert logits.name == "logits" and list(logits.dims) == [1, 256, 256]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0]
    model_file = config_path.parent / "1" / "model.onnx"
    assert model_file.read_bytes() == bundle_copy.onnx_path.read_bytes()
    # The repository is part of the bundle: listed and hashed, so the bundle still verifies.
    listed = {e.path for e in load_bundle(bundle_copy.path).manifest.files}
    assert "triton/lesion-unet/config.pbtxt" in listed


def test_plans_are_mapped_per_compute_capability(bundle_copy: Bundle) -> None:
    manifest = bundle_copy.manifest
    for device in (DeviceFacts("NVIDIA A100", (8, 0), 108, "10.16.1.11"), DeviceFacts("Orin", (8, 7), 16, "10.3.0.30")):
        key = EngineKey(device, "fp32")
        key.plan_path(bundle_copy.path).parent.mkdir(exist_ok=True)
        key.plan_path(bundle_copy.path).write_bytes(device.gpu_name.encode())
        entry = manifest_pb2.EngineEntry(
            plan=f"engines/{key.stem}.plan",
            compute_capability=device.cc,
            precision=manifest.precision,
            dla_core=-1,
        )
        write_sidecar(key.sidecar_path(bundle_copy.path), entry)
        manifest.engines.append(entry)
    write_manifest(bundle_copy.path, manifest)
    _, plan_config_path = write_repository(load_bundle(bundle_copy.path), TritonOptions(max_batch_size=0))
    config = _parse(plan_config_path)
    assert config.platform == "tensorrt_plan" and config.name == "lesion-unet-tensorrt"
    assert dict(config.cc_model_filenames) == {
        "8.0": "nvidia-a100_sm80_108sm_trt10.16.1_fp32.plan",
        "8.7": "orin_sm87_16sm_trt10.3.0_fp32.plan",
    }
    # max_batch_size 0: no implicit batch axis, so the dims carry it (dynamic, -1).
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [-1, 1, 256, 256]
    assert not config.HasField("dynamic_batching")
    assert (plan_config_path.parent / "1" / "orin_sm87_16sm_trt10.3.0_fp32.plan").read_bytes() == b"Orin"


def test_unknown_instance_kind_is_refused(bundle_copy: Bundle) -> None:
    with pytest.raises(ConfigError, match="KIND_TPU"):
        write_repository(bundle_copy, TritonOptions(kind="KIND_TPU"))
