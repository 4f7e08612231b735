"""Every TensorRT name our code and our stubs use exists in the real bindings of TensorRT 10 and 11.

The small ``tensorrt_cu1X_bindings`` wheels on PyPI carry the compiled module;
its pybind11 names are NUL-terminated strings in the shared object, so they
can be checked without a GPU or the TensorRT libraries. The wheels are
downloaded once into the virtualenv and reused.

The main check of the TensorRT code is mypy against typed stubs of each
generation (tests/test_tensorrt_types.py); these cross-check names: every name
the stubs declare, a static scan of ``export/tensorrt/*.py`` and
``runtime/backends/tensorrt.py`` for names reached from ``trt`` and TensorRT
objects, and a run of the builder against a recording stand-in for each
generation, which records exactly the names that generation's code path
touches.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from edgescope.bundle import Bundle, load_bundle, write_manifest
from edgescope.engines import DeviceFacts, read_sidecar
from edgescope.export.tensorrt import builder as builder_module
from edgescope.export.tensorrt import calibrator as calibrator_module
from edgescope.v1 import manifest_pb2

from .conftest import ROOT, onnxruntime_engine

# Each source and the variables (or attributes of self) that hold the tensorrt module or its objects there.
# The _10 names are untyped views of what only TensorRT 10 has (see builder.py, calibrator.py).
EXPORT_ROOTS = {
    *("trt", "builder", "network", "config", "parser", "profile", "tensor", "logger"),
    *("trt_10", "flags_10", "config_10"),
}
TRT_SOURCES = {
    **{path: EXPORT_ROOTS for path in sorted((ROOT / "export" / "tensorrt").glob("*.py"))},
    ROOT / "runtime" / "backends" / "tensorrt.py": {
        "trt",
        "self.logger",
        "self.runtime",
        "self.engine",
        "self._engine",
        "self._context",
    },
}
STUBS = {major: ROOT / "typings" / f"tensorrt{major}" / "tensorrt" / "__init__.pyi" for major in (10, 11)}
WHEELS = {10: "tensorrt_cu12_bindings==10.*", 11: "tensorrt_cu13_bindings==11.*"}
TRT10_ONLY = builder_module.TRT10_ONLY | calibrator_module.TRT10_ONLY
# What TensorRT 11 removed, per NVIDIA's 10.x -> 11.x migration guide: our 10-only path must be needed.
REMOVED_IN_11 = {
    "FP16",
    "IInt8EntropyCalibrator2",
    "int8_calibrator",
    "set_calibration_profile",
    "get_batch_size",
    "read_calibration_cache",
}
CACHE = Path(sys.prefix) / "tensorrt-bindings"


def _download(major: int) -> Path:
    folder = CACHE / str(major)
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version=3.11",
            "--platform=manylinux_2_28_x86_64",
            "--dest",
            str(folder),
            WHEELS[major],
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip(f"PyPI did not answer within 300 s for {WHEELS[major]}")
        wheels = sorted(folder.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {WHEELS[major]} from PyPI: {done.stderr.strip()[-300:]}")
    return wheels[-1]


@pytest.fixture(scope="module", params=sorted(WHEELS))
def bindings(request: pytest.FixtureRequest) -> tuple[int, bytes]:
    """(major version, the bytes of its compiled module)."""
    major: int = request.param
    wheel = _download(major)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert any(n.startswith(f"tensorrt_cu{12 if major == 10 else 13}_bindings-{major}.") for n in names)
        (module,) = [n for n in names if n.endswith("/tensorrt.so")]
        return major, archive.read(module)


def python_names(major: int) -> set[str]:
    """Names the bindings' package defines in Python (``nptype`` and its parameter, ...), beside its module."""
    with zipfile.ZipFile(_download(major)) as archive:
        tree = ast.parse(archive.read("tensorrt_bindings/__init__.py"))
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    return names | {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}


def _has(blob: bytes, name: str) -> bool:
    # pybind11 keeps each name as a C string; the linker may share a tail with a longer one.
    return name.encode() + b"\0" in blob


def _origin(node: ast.expr) -> str | None:
    """The variable (or ``self.attribute``) a chain of attributes, calls and subscripts starts from."""
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def scanned_names() -> set[str]:
    """Attribute names reached from a TensorRT object in our sources, plus methods our subclasses override."""
    names: set[str] = set()
    for path, roots in TRT_SOURCES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                if _origin(node.value) in roots:
                    names.add(node.attr)
            elif isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Attribute) and _origin(b.value) in roots for b in node.bases
            ):
                names.update(f.name for f in node.body if isinstance(f, ast.FunctionDef) and f.name != "__init__")
    return names


def test_the_scan_sees_the_builder_and_the_runtime() -> None:
    names = scanned_names()
    # A scan that found nothing would pass every check below.
    assert {"BuilderFlag", "create_optimization_profile", "set_memory_pool_limit", "get_batch", "INT8"} <= names
    assert {"deserialize_cuda_engine", "create_execution_context", "set_tensor_address", "execute_async_v3"} <= names


def stub_names(major: int) -> set[str]:
    """Every public name the stubs of TensorRT ``major`` declare: classes, functions, attributes, parameters."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(STUBS[major].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.arg) and node.arg != "self":
            names.add(node.arg)
    # Private names are the stubs' own (type aliases, a common enum base); dunders are Python's.
    return {n for n in names if not n.startswith("_")}


def test_every_stub_name_exists_in_the_bindings(bindings: tuple[int, bytes]) -> None:
    major, blob = bindings
    names = stub_names(major)
    assert {"Builder", "IBuilderConfig", "set_tensor_address", "stream_handle", "nptype"} <= names
    missing = sorted(n for n in names - python_names(major) if not _has(blob, n))
    assert not missing, f"the TensorRT {major} stubs declare {missing}, which its bindings lack"


def test_the_tensorrt_11_stubs_lack_what_11_removed() -> None:
    assert not stub_names(11) & REMOVED_IN_11
    assert stub_names(10) >= REMOVED_IN_11


def test_every_scanned_name_exists_in_the_bindings(bindings: tuple[int, bytes]) -> None:
    major, blob = bindings
    wanted = scanned_names() if major == 10 else scanned_names() - TRT10_ONLY
    missing = sorted(n for n in wanted - python_names(major) if not _has(blob, n))
    assert not missing, f"TensorRT {major} bindings lack {missing}"


def test_tensorrt_11_removed_what_only_the_10_path_uses(bindings: tuple[int, bytes]) -> None:
    major, blob = bindings
    present = {n for n in REMOVED_IN_11 if _has(blob, n)}
    assert present == (REMOVED_IN_11 if major == 10 else set())


class Recorder:
    """A stand-in for the tensorrt module and its objects that records every name touched."""

    def __init__(self, touched: set[str], version: str = "") -> None:
        object.__setattr__(self, "_touched", touched)
        object.__setattr__(self, "__version__", version)

    def __getattr__(self, name: str) -> Recorder:
        if name.startswith("_"):
            # Importing it probes module dunders (__spec__); TensorRT's API has no private names to record.
            raise AttributeError(name)
        self._touched.add(name)
        return Recorder(self._touched)

    def __setattr__(self, name: str, value: object) -> None:
        self._touched.add(name)

    def __call__(self, *args: object, **kwargs: object) -> Recorder:
        return Recorder(self._touched)

    def __int__(self) -> int:
        return 0

    def __index__(self) -> int:
        return 1  # one network input

    def __iter__(self) -> Any:
        return iter([-1, 1, 256, 256])  # an input shape with a dynamic batch

    def __bytes__(self) -> bytes:
        return b"plan"


@pytest.fixture
def bundle_copy(example_bundle: Bundle, tmp_path: Path) -> Bundle:
    shutil.copytree(example_bundle.path, tmp_path / "b")
    return load_bundle(tmp_path / "b")


def _as_precision(bundle: Bundle, precision: str) -> Bundle:
    # The stand-in never reads the graph; only the manifest's precision steers the build.
    bundle.manifest.precision = manifest_pb2.Precision.Value(f"PRECISION_{precision.upper()}")
    write_manifest(bundle.path, bundle.manifest)
    return load_bundle(bundle.path)


@pytest.mark.parametrize(
    ("version", "bundle_precision", "engine_precision"),
    [
        ("10.16.1.11", "fp32", "fp32"),
        ("10.16.1.11", "fp32", "fp16"),
        ("10.16.1.11", "fp32", "int8"),
        ("10.16.1.11", "int8", "int8"),
        ("11.4.0.106", "fp32", "fp32"),
        ("11.4.0.106", "fp16", "fp16"),
        ("11.4.0.106", "int8", "int8"),
    ],
)
def test_each_generation_touches_only_its_own_names(
    bindings: tuple[int, bytes],
    bundle_copy: Bundle,
    monkeypatch: pytest.MonkeyPatch,
    version: str,
    bundle_precision: str,
    engine_precision: str,
) -> None:
    major, blob = bindings
    if int(version.split(".")[0]) != major:
        pytest.skip(f"this case is for TensorRT {version.split('.')[0]}")
    touched: set[str] = set()
    monkeypatch.setitem(sys.modules, "tensorrt", Recorder(touched, version))
    monkeypatch.setattr(calibrator_module, "entropy_calibrator", lambda *args: object())
    bundle = _as_precision(bundle_copy, bundle_precision)
    device = DeviceFacts("NVIDIA RTX A4000", (8, 6), 48, version)
    options = builder_module.EngineOptions(
        precision=engine_precision,
        calibration_data="synthetic:ultrasound?seed=5&frames=2",
        calibration_samples=2,
        timing_cache=bundle.path.parent / "timing.cache",
        dla_core=0 if major == 10 else -1,
        hardware_compatibility="ampere_plus",
        version_compatible=True,
    )
    entry = builder_module.build_engine(
        bundle, options, device=device, log=lambda _line: None, engine_runner=onnxruntime_engine
    )
    missing = sorted(n for n in touched if not _has(blob, n))
    assert not missing, f"TensorRT {major} bindings lack {missing}"
    if major == 11:
        assert not touched & TRT10_ONLY
    weak = engine_precision != bundle_precision
    assert entry.strongly_typed is not weak
    assert ("INT8" in touched) is (weak and engine_precision == "int8")
    assert entry.self_test.passed  # gated on the golden frames (by a stand-in engine here)
    assert read_sidecar(bundle.path / entry.plan.replace(".plan", ".json")) == entry
    assert load_bundle(bundle.path).manifest.engines[0] == entry  # re-hashed, so it still verifies
