"""`edgescope validate` (golden frames here, or the gate against a model named on the command line)
and the export command's precision, engine and Triton options."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgescope.bundle import Bundle, load_bundle, write_manifest
from edgescope.cli import main
from edgescope.v1 import manifest_pb2

from .conftest import EXAMPLE

pytest.importorskip("torch")

FACTORY = str(EXAMPLE / "model.py") + ":build"


@pytest.fixture
def bundle_copy(example_bundle: Bundle, tmp_path: Path) -> Bundle:
    shutil.copytree(example_bundle.path, tmp_path / "b")
    return load_bundle(tmp_path / "b")


def test_validate_without_a_model_runs_the_golden_frames_and_changes_nothing(
    bundle_copy: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (bundle_copy.path / "manifest.json").read_bytes()
    assert main(["validate", str(bundle_copy.path)]) == 0
    out = capsys.readouterr().out
    assert "self-test PASSED: onnxruntime" in out and "golden frames" in out and "machine:" in out
    assert (bundle_copy.path / "manifest.json").read_bytes() == before


def test_validate_prints_the_domain_profile_or_that_the_check_is_off(
    bundle_copy: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = bundle_copy.manifest.domain
    assert bundle_copy.manifest.HasField("domain") and profile.features
    assert main(["validate", str(bundle_copy.path)]) == 0
    out = capsys.readouterr().out
    assert f"domain profile: fitted on {profile.fit_frames} frames of {profile.data_source}" in out
    assert f"threshold {profile.threshold:.3f}" in out and f"false-alarm rate of {profile.false_alarm_rate:g}" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  input0_")}
    assert rows["input0_p50"] == [f"{profile.mean[1]:.4g}", f"{profile.scale[1]:.4g}"]
    assert all(name in out for name in profile.features)
    assert f"{profile.score_spread:.4g} * chi2({profile.score_degrees:.4g})" in out

    manifest = bundle_copy.manifest
    manifest.ClearField("domain")
    write_manifest(bundle_copy.path, manifest)
    assert main(["validate", str(bundle_copy.path)]) == 0
    assert "domain profile: none; the out-of-domain check and the drift test are off" in capsys.readouterr().out


def test_validate_with_the_model_reruns_the_gate_and_saves_it(
    bundle_copy: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["validate", str(bundle_copy.path), "--factory", FACTORY, "--samples", "3"]
    assert main([*args, "--data", "synthetic:ultrasound?seed=8", "--golden-frames", "2"]) == 0
    out = capsys.readouterr().out
    assert "accuracy gate: onnxruntime" in out and "dice_min" in out and "accuracy gate PASSED" in out
    manifest = load_bundle(bundle_copy.path).manifest  # hashes re-written: it verifies
    report = manifest.validation
    assert report.passed and report.samples == 3 and report.data_source == "synthetic:ultrasound?seed=8"
    assert manifest.golden.frames == 2 and manifest.golden.data_source == "synthetic:ultrasound?seed=8"


def test_validate_that_fails_marks_the_bundle_failed(bundle_copy: Bundle) -> None:
    from edgescope.errors import BundleError
    from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgescope.runtime.server.registry import ModelRegistry

    args = ["validate", str(bundle_copy.path), "--factory", FACTORY, "--samples", "2", "--min-dice", "1.5"]
    assert main(args) == 1
    assert not load_bundle(bundle_copy.path).manifest.validation.passed
    with pytest.raises(BundleError, match="accuracy gate"):
        ModelRegistry(OnnxRuntimeBackend()).load(bundle_copy.path)


def test_validate_refuses_other_weights(
    bundle_copy: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pt"
    other.write_bytes((EXAMPLE / "weights.pt").read_bytes() + b"\0")
    args = ["validate", str(bundle_copy.path), "--factory", FACTORY]
    assert main([*args, "--weights", str(other)]) == 2
    assert "not the file this bundle was exported from" in capsys.readouterr().err


def test_validate_never_runs_the_factory_a_manifest_names(
    bundle_copy: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    planted = tmp_path / "planted.py"
    planted.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\ndef build(): ...\n")
    manifest = bundle_copy.manifest
    manifest.model_source.factory = f"{planted}:build"
    write_manifest(bundle_copy.path, manifest)
    assert main(["validate", str(bundle_copy.path)]) == 0  # the golden frames, nothing imported
    assert main(["validate", str(bundle_copy.path), "--samples", "2"]) == 2
    assert "needs --factory or --torchscript" in capsys.readouterr().err
    assert not marker.exists()


def test_validate_int8_reports_fake_quant_and_this_cpus_integer_kernels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    args = ["export", "--name", "m", "--out", str(out), "--factory", FACTORY, "--weights", str(EXAMPLE / "weights.pt")]
    args += ["--precision", "int8", "--calibration-data", "synthetic:ultrasound?seed=11", "--samples", "4"]
    assert main([*args, "--no-engines", "--golden-frames", "2"]) == 0
    assert "onnxruntime's integer kernels on this CPU" in capsys.readouterr().out
    code = main(["validate", str(out)])
    printed = capsys.readouterr().out
    assert code == 0  # the verdict on the bundle is its fake-quant run, the same on every CPU
    assert "int8 fake-quant on 2 golden frames" in printed and "int8 integer kernels on 2 golden frames" in printed


def test_export_int8_without_calibration_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["export", "--name", "m", "--out", str(tmp_path / "b"), "--factory", FACTORY]
    assert main([*args, "--weights", str(EXAMPLE / "weights.pt"), "--precision", "int8"]) == 2
    assert "INT8 needs calibration frames" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_export_fp16_with_triton_and_no_engines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    args = ["export", "--name", "m", "--out", str(out), "--factory", FACTORY]
    args += ["--weights", str(EXAMPLE / "weights.pt"), "--samples", "2", "--precision", "fp16"]
    assert main([*args, "--format", "triton", "--no-engines", "--fp32-ops", "Softmax,Resize"]) == 0
    printed = capsys.readouterr().out
    assert "convert to fp16" in printed and "Triton model repository" in printed
    assert "next: edgescope serve" in printed and "triton/m/config.pbtxt" in printed
    manifest = load_bundle(out).manifest
    assert manifest.precision == manifest_pb2.PRECISION_FP16
    assert list(manifest.precision_settings.fp32_op_types) == ["Softmax", "Resize"]
    assert (out / "triton" / "m" / "1" / "model.onnx").is_file()
