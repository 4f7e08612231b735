"""The self-test on golden frames: what every device runs before it serves a bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import json_format

from edgescope.bundle import Bundle, load_bundle, write_manifest
from edgescope.errors import BackendError
from edgescope.runtime.backends.base import Feed, Outputs
from edgescope.runtime.evaluation import (
    GOLDEN_FILE,
    format_self_test,
    onnxruntime_runner,
    onnxruntime_self_test,
    read_golden,
    remote_info,
    self_test,
)
from edgescope.v1 import manifest_pb2


@pytest.fixture
def bundle_copy(example_bundle: Bundle, tmp_path: Path) -> Bundle:
    shutil.copytree(example_bundle.path, tmp_path / "b")
    return load_bundle(tmp_path / "b")


def test_the_exported_bundle_carries_golden_frames_and_passes(example_bundle: Bundle) -> None:
    golden = example_bundle.manifest.golden
    assert golden.path == GOLDEN_FILE and GOLDEN_FILE in {e.path for e in example_bundle.manifest.files}
    assert golden.frames == len(golden.gate_frames) > 0 and not golden.sequence
    assert golden.reference_runner.kind == "pytorch" and not golden.HasField("gated_runner")  # FP32: reference only
    assert golden.limits.min_frame_dice == 0.99
    data = read_golden(example_bundle)
    assert data.inputs[0].shape == (1, 1, 256, 256) and data.gated is None
    report = onnxruntime_self_test(example_bundle)
    assert report.passed, report.reasons
    assert report.frames == golden.frames and report.runner.kind == "onnxruntime"
    assert report.versus_reference.candidate_runner.artifact_sha256 == example_bundle.onnx_sha256
    assert report.machine.architecture and report.seconds > 0
    # The report goes into GetModel and provenance as JSON (limits without a bound are infinities).
    assert json_format.Parse(json_format.MessageToJson(report), manifest_pb2.SelfTestReport()) == report
    assert "self-test PASSED" in format_self_test(report)


def test_an_altered_graph_fails_its_self_test_even_when_re_hashed(bundle_copy: Bundle) -> None:
    model = onnx.load(str(bundle_copy.onnx_path))
    last_conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    (bias,) = [t for t in model.graph.initializer if t.name == last_conv.input[2]]
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 10.0, bias.name))
    onnx.save(model, str(bundle_copy.onnx_path))
    write_manifest(bundle_copy.path, bundle_copy.manifest)  # the tamperer re-hashes: the bundle still verifies
    tampered = load_bundle(bundle_copy.path)
    report = onnxruntime_self_test(tampered)
    assert not report.passed
    assert any("dice_min" in reason and "frames below 0.99" in reason for reason in report.reasons)
    assert any("error_vs_tolerance" in reason for reason in report.reasons)


def test_a_bundle_without_golden_frames_fails_with_the_reason(bundle_copy: Bundle) -> None:
    (bundle_copy.path / GOLDEN_FILE).unlink()
    bundle_copy.manifest.ClearField("golden")
    write_manifest(bundle_copy.path, bundle_copy.manifest)
    report = onnxruntime_self_test(load_bundle(bundle_copy.path))
    assert not report.passed and report.frames == 0
    assert "no golden frames" in report.reasons[0] and "re-export" in report.reasons[0]


def test_golden_frames_that_do_not_match_their_hash_fail(bundle_copy: Bundle) -> None:
    path = bundle_copy.path / GOLDEN_FILE
    path.write_bytes(path.read_bytes() + b"\0")
    report = onnxruntime_self_test(load_bundle(bundle_copy.path, verify=False))
    assert not report.passed and "sha256" in report.reasons[0]


def test_a_runner_that_raises_is_refused_with_its_error(example_bundle: Bundle) -> None:
    def broken(feed: Feed) -> Outputs:
        raise BackendError("CUDA error: an illegal memory access was encountered")

    info = manifest_pb2.RunnerInfo(kind="tensorrt", device="cuda:0", precision=manifest_pb2.PRECISION_FP32)
    report = self_test(example_bundle, broken, info)
    assert not report.passed
    assert report.reasons == [
        "tensorrt cuda:0 fp32 failed on the golden frames: BackendError: CUDA error: an illegal memory access was "
        "encountered"
    ]


def test_a_runner_missing_an_output_is_refused(example_bundle: Bundle) -> None:
    def renamed(feed: Feed) -> Outputs:
        return {"other": np.zeros((1, 1, 256, 256), np.float32)}

    report = self_test(example_bundle, renamed, manifest_pb2.RunnerInfo(kind="remote"))
    assert not report.passed and "gave no logits" in report.reasons[0]


def test_any_callable_runs_the_golden_frames_a_remote_server_too(example_bundle: Bundle) -> None:
    local = onnxruntime_runner(example_bundle.onnx_path, example_bundle.manifest.precision)
    info = remote_info("10.0.0.7:8001", "lesion-unet", "3", example_bundle.manifest.precision)
    report = self_test(example_bundle, local.infer, info)
    assert report.passed and report.runner.device == "remote:10.0.0.7:8001"
    assert report.versus_reference.candidate == "remote remote:10.0.0.7:8001 fp32 (model lesion-unet version 3)"
