"""Engine cache keys, sidecars and compatibility checks, with injected device facts."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgescope.bundle import Bundle, load_bundle
from edgescope.engines import (
    GPU,
    DeviceFacts,
    EngineKey,
    engines_in,
    incompatibility,
    read_sidecar,
    select_engine,
    write_sidecar,
)
from edgescope.errors import BundleError, ConfigError, MissingDependencyError
from edgescope.export.tensorrt import EngineOptions, build_engine
from edgescope.v1 import manifest_pb2

A4000 = DeviceFacts("NVIDIA RTX A4000", (8, 6), 48, "10.16.1.11")
A2000 = DeviceFacts("NVIDIA RTX A2000", (8, 6), 26, "10.16.1.11")
ORIN = DeviceFacts("Orin", (8, 7), 16, "10.3.0.30")
T4 = DeviceFacts("Tesla T4", (7, 5), 40, "10.16.1.11")


def _entry(key: EngineKey, **changes: object) -> manifest_pb2.EngineEntry:
    entry = manifest_pb2.EngineEntry(
        plan=f"engines/{key.stem}.plan",
        gpu_name=key.device.gpu_name,
        compute_capability=key.device.cc,
        sm_count=key.device.sm_count,
        tensorrt_version=key.device.tensorrt_version,
        precision=manifest_pb2.Precision.Value(f"PRECISION_{key.precision.upper()}"),
        dla_core=key.dla_core,
        hardware_compatibility="none",
    )
    for name, value in changes.items():
        setattr(entry, name, value)
    return entry


def _install(bundle_dir: Path, entry: manifest_pb2.EngineEntry) -> Path:
    plan = bundle_dir / entry.plan
    plan.parent.mkdir(exist_ok=True)
    plan.write_bytes(b"plan bytes")
    write_sidecar(plan.with_suffix(".json"), entry)
    return plan


def test_key_names_are_readable_and_distinct() -> None:
    assert EngineKey(A4000, "fp16").stem == "nvidia-rtx-a4000_sm86_48sm_trt10.16.1_fp16"
    assert EngineKey(ORIN, "int8", dla_core=1).stem == "orin_sm87_16sm_trt10.3.0_int8_dla1"
    keys = {EngineKey(d, p, c).stem for d in (A4000, A2000, ORIN, T4) for p in ("fp16", "int8") for c in (GPU, 0)}
    assert len(keys) == 16


def test_sidecar_round_trip(tmp_path: Path) -> None:
    entry = _entry(EngineKey(A4000, "fp16"), min_batch=1, opt_batch=4, max_batch=8, strongly_typed=True)
    write_sidecar(tmp_path / "e.json", entry)
    assert read_sidecar(tmp_path / "e.json") == entry
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BundleError, match="sidecar"):
        read_sidecar(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("built", "changes", "device", "reason"),
    [
        (A4000, {}, A4000, None),
        (A4000, {}, A2000, "built on NVIDIA RTX A4000 \\(48 SMs\\)"),
        (A4000, {"hardware_compatibility": "same_compute_capability"}, A2000, None),
        (A4000, {}, T4, "compute capability 8.6, this GPU is 7.5"),
        (A4000, {"hardware_compatibility": "ampere_plus"}, ORIN, "TensorRT 10.16.1.11"),
        (A4000, {"hardware_compatibility": "ampere_plus"}, T4, "Ampere and later"),
        (ORIN, {"tensorrt_version": "10.3.0.26"}, ORIN, "TensorRT 10.3.0.26, this device has TensorRT 10.3.0.30"),
        (ORIN, {"tensorrt_version": "10.1.0.27", "version_compatible": True}, ORIN, None),
        (A4000, {"version_compatible": True}, DeviceFacts("NVIDIA RTX A4000", (8, 6), 48, "11.4.0.106"), "11.4"),
    ],
)
def test_compatibility(built: DeviceFacts, changes: dict[str, object], device: DeviceFacts, reason: str | None) -> None:
    found = incompatibility(_entry(EngineKey(built, "fp16"), **changes), device)
    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert re.search(reason, found), found


def test_select_engine_picks_the_fitting_plan(tmp_path: Path) -> None:
    mine = _install(tmp_path, _entry(EngineKey(A4000, "fp16")))
    _install(tmp_path, _entry(EngineKey(T4, "fp16")))
    _install(tmp_path, _entry(EngineKey(A4000, "int8")))
    assert select_engine(tmp_path, A4000, "fp16") == mine
    assert [e.gpu_name for e in engines_in(tmp_path)] == ["NVIDIA RTX A4000", "NVIDIA RTX A4000", "Tesla T4"]


def test_select_engine_explains_why_nothing_fits(tmp_path: Path) -> None:
    _install(tmp_path, _entry(EngineKey(T4, "fp16")))
    with pytest.raises(BundleError) as caught:
        select_engine(tmp_path, A4000, "fp16")
    message = str(caught.value)
    assert "tesla-t4_sm75_40sm_trt10.16.1_fp16.plan: built for compute capability 7.5" in message
    assert "edgescope engines" in message
    assert select_engine(tmp_path, A4000, "fp16", allow_rebuild=True) is None
    with pytest.raises(BundleError, match="none is there"):
        select_engine(tmp_path, A4000, "fp16", dla_core=0)


def test_select_engine_reports_a_missing_plan(tmp_path: Path) -> None:
    _install(tmp_path, _entry(EngineKey(A4000, "fp16"))).unlink()
    with pytest.raises(BundleError, match="missing"):
        select_engine(tmp_path, A4000, "fp16")


@pytest.fixture
def bundle_copy(example_bundle: Bundle, tmp_path: Path) -> Bundle:
    shutil.copytree(example_bundle.path, tmp_path / "b")
    return load_bundle(tmp_path / "b")


def test_tensorrt_11_refuses_a_precision_the_graph_does_not_carry(
    bundle_copy: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="11.4.0.106"))
    with pytest.raises(ConfigError, match="export --precision fp16"):
        build_engine(bundle_copy, EngineOptions(precision="fp16"), device=A4000, log=lambda _: None)


def test_tensorrt_10_int8_from_fp32_needs_calibration_frames(
    bundle_copy: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.16.1.11"))
    with pytest.raises(ConfigError, match="calibration"):
        build_engine(bundle_copy, EngineOptions(precision="int8"), device=A4000, log=lambda _: None)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (EngineOptions(min_batch=4, opt_batch=2), "min <= opt <= max"),
        (EngineOptions(hardware_compatibility="any"), "hardware compatibility"),
        (EngineOptions(optimization_level=9), "optimization level"),
    ],
)
def test_bad_engine_options_are_refused(bundle_copy: Bundle, options: EngineOptions, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_engine(bundle_copy, options, device=A4000, log=lambda _: None)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_extra(bundle_copy: Bundle) -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgescope\[tensorrt\]'"):
        build_engine(bundle_copy, device=A4000, log=lambda _: None)


def test_export_imports_without_tensorrt() -> None:
    code = "import sys, edgescope.export, edgescope.engines; print('tensorrt' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.gpu
def test_build_an_engine_on_this_gpu(bundle_copy: Bundle) -> None:
    pytest.importorskip("tensorrt")
    from edgescope.engines import device_facts

    entry = build_engine(bundle_copy, EngineOptions(max_batch=2), log=lambda _: None)
    device = device_facts()
    assert select_engine(bundle_copy.path, device, "fp32") == bundle_copy.path / entry.plan
    assert load_bundle(bundle_copy.path).manifest.engines[0].plan == entry.plan
