"""`edgescope validate` and the export command's precision, engine and Triton options."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgescope.bundle import Bundle, load_bundle, write_manifest
from edgescope.cli import main
from edgescope.v1 import manifest_pb2

from .conftest import EXAMPLE

pytest.importorskip("torch")


@pytest.fixture
def bundle_copy(example_bundle: Bundle, tmp_path: Path) -> Bundle:
    shutil.copytree(example_bundle.path, tmp_path / "b")
    return load_bundle(tmp_path / "b")


def test_validate_reruns_the_gate_and_saves_it(bundle_copy: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(bundle_copy.path), "--samples", "3", "--data", "synthetic:ultrasound?seed=8"]) == 0
    out = capsys.readouterr().out
    assert "accuracy gate: onnxruntime" in out and "dice_min" in out and "gate PASSED" in out
    report = load_bundle(bundle_copy.path).manifest.validation  # hashes re-written: it verifies
    assert report.passed and report.samples == 3 and report.data_source == "synthetic:ultrasound?seed=8"


def test_validate_that_fails_marks_the_bundle_failed(bundle_copy: Bundle) -> None:
    from edgescope.errors import BundleError
    from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgescope.runtime.server.registry import ModelRegistry

    assert main(["validate", str(bundle_copy.path), "--samples", "2", "--min-dice", "1.5"]) == 1
    assert not load_bundle(bundle_copy.path).manifest.validation.passed
    with pytest.raises(BundleError, match="accuracy gate"):
        ModelRegistry(OnnxRuntimeBackend()).load(bundle_copy.path)


def test_validate_refuses_other_weights(
    bundle_copy: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pt"
    other.write_bytes((EXAMPLE / "weights.pt").read_bytes() + b"\0")
    args = ["validate", str(bundle_copy.path), "--factory", str(EXAMPLE / "model.py") + ":build"]
    assert main([*args, "--weights", str(other)]) == 2
    assert "not the file this bundle was exported from" in capsys.readouterr().err


def test_validate_without_a_model_source_says_what_to_give(
    bundle_copy: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = bundle_copy.manifest
    manifest.model_source.CopyFrom(manifest_pb2.ModelSource())
    write_manifest(bundle_copy.path, manifest)
    assert main(["validate", str(bundle_copy.path)]) == 2
    assert "--factory and --weights" in capsys.readouterr().err


def test_export_int8_without_calibration_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["export", "--name", "m", "--out", str(tmp_path / "b"), "--factory", str(EXAMPLE / "model.py") + ":build"]
    assert main([*args, "--weights", str(EXAMPLE / "weights.pt"), "--precision", "int8"]) == 2
    assert "INT8 needs calibration frames" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_export_fp16_with_triton_and_no_engines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    args = ["export", "--name", "m", "--out", str(out), "--factory", str(EXAMPLE / "model.py") + ":build"]
    args += ["--weights", str(EXAMPLE / "weights.pt"), "--samples", "2", "--precision", "fp16"]
    assert main([*args, "--format", "triton", "--no-engines", "--fp32-ops", "Softmax,Resize"]) == 0
    printed = capsys.readouterr().out
    assert "convert to fp16" in printed and "Triton model repository" in printed
    assert "next: edgescope serve" in printed and "triton/m/config.pbtxt" in printed
    manifest = load_bundle(out).manifest
    assert manifest.precision == manifest_pb2.PRECISION_FP16
    assert list(manifest.precision_settings.fp32_op_types) == ["Softmax", "Resize"]
    assert (out / "triton" / "m" / "1" / "model.onnx").is_file()
