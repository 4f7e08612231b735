"""Engines are gated on the golden frames right after they are built.

Without a GPU the engine is a stand-in (the bundle's graph in ONNX Runtime,
or a broken copy of it) behind a recording TensorRT; the ``gpu`` test builds
and gates a real engine.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from edgescope.bundle import Bundle, load_bundle, sha256_file
from edgescope.engines import DeviceFacts, read_sidecar
from edgescope.errors import BackendError, ValidationFailedError
from edgescope.export.tensorrt import EngineOptions, build_engine
from edgescope.runtime.backends.base import Feed, Outputs
from edgescope.runtime.evaluation import Runner, onnxruntime_runner, self_test, tensorrt_info, tensorrt_runner
from edgescope.v1 import manifest_pb2

from .conftest import onnxruntime_engine
from .test_tensorrt_api import Recorder

H200 = DeviceFacts("NVIDIA H200", (9, 0), 132, "10.16.1.11")


@pytest.fixture
def bundle_copy(example_bundle: Bundle, tmp_path: Path) -> Bundle:
    shutil.copytree(example_bundle.path, tmp_path / "b")
    return load_bundle(tmp_path / "b")


@pytest.fixture
def recording_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", Recorder(set(), H200.tensorrt_version))


@contextmanager
def off_by_a_lot(bundle: Bundle, entry: manifest_pb2.EngineEntry, *, device: int = 0) -> Iterator[Runner]:
    """An engine whose outputs drifted: every logit up by 8, so every pixel reads as lesion."""
    with onnxruntime_engine(bundle, entry, device=device) as runner:

        def infer(feed: Feed) -> Outputs:
            return {name: value + 8.0 for name, value in runner.infer(feed).items()}

        yield Runner(infer, runner.info)


@contextmanager
def cannot_load(bundle: Bundle, entry: manifest_pb2.EngineEntry, *, device: int = 0) -> Iterator[Runner]:
    raise BackendError("TensorRT could not deserialize the plan")
    yield  # pragma: no cover


def _build(bundle: Bundle, engine: Any, **options: Any) -> manifest_pb2.EngineEntry:
    return build_engine(bundle, EngineOptions(**options), device=H200, log=lambda _line: None, engine_runner=engine)


@pytest.mark.usefixtures("recording_tensorrt")
def test_an_engine_that_reproduces_the_golden_frames_is_kept_with_its_report(bundle_copy: Bundle) -> None:
    entry = _build(bundle_copy, onnxruntime_engine)
    report = entry.self_test
    assert report.passed and report.frames == bundle_copy.manifest.golden.frames
    assert report.runner.kind == "tensorrt" and report.runner.detail == entry.plan
    assert report.machine.gpu == "NVIDIA H200" and report.machine.tensorrt_version == "10.16.1.11"
    assert read_sidecar(bundle_copy.path / entry.plan.replace(".plan", ".json")).self_test == report
    assert load_bundle(bundle_copy.path).manifest.engines[0].self_test.passed


@pytest.mark.usefixtures("recording_tensorrt")
def test_an_engine_that_fails_its_golden_frames_is_not_kept(bundle_copy: Bundle) -> None:
    with pytest.raises(ValidationFailedError, match=r"failed its golden-frame gate on NVIDIA H200 \(.*dice_min"):
        _build(bundle_copy, off_by_a_lot)
    assert not list((bundle_copy.path / "engines").iterdir())
    assert not load_bundle(bundle_copy.path).manifest.engines


@pytest.mark.usefixtures("recording_tensorrt")
def test_a_forced_engine_is_kept_marked_failed(bundle_copy: Bundle) -> None:
    entry = _build(bundle_copy, off_by_a_lot, force=True)
    assert not entry.self_test.passed and entry.self_test.reasons
    assert (bundle_copy.path / entry.plan).is_file()
    assert not load_bundle(bundle_copy.path).manifest.engines[0].self_test.passed


@pytest.mark.usefixtures("recording_tensorrt")
def test_an_engine_that_cannot_load_fails_with_the_reason(bundle_copy: Bundle) -> None:
    entry = _build(bundle_copy, cannot_load, force=True)
    assert not entry.self_test.passed
    assert "could not run: TensorRT could not deserialize the plan" in entry.self_test.reasons[0]


@pytest.mark.usefixtures("recording_tensorrt")
def test_a_precision_other_than_the_bundles_is_held_to_that_precisions_limits(bundle_copy: Bundle) -> None:
    # TensorRT 10 builds an FP16 engine from an FP32 bundle by flag: nothing was gated at FP16, so
    # the engine meets FP16's limits against the reference (here the stand-in runs FP32, well within).
    entry = _build(bundle_copy, onnxruntime_engine, precision="fp16")
    assert entry.self_test.passed and not entry.self_test.HasField("versus_gated")
    limits = {m.name: m.threshold for m in entry.self_test.versus_reference.metrics}
    assert entry.self_test.versus_reference.limits.max_abs_error == 0.5 and limits["dice_min"] == 0.9


class FakeTensorRTSession:
    """Shaped like the runtime's TensorRTSession (built from manifest, plan bytes and sidecar; infer; describe;
    a context manager); runs the bundle's graph, which it finds beside the plan's test bundle."""

    opened: ClassVar[list[tuple[bytes, str]]] = []
    bundle: ClassVar[Path]

    def __init__(
        self, manifest: manifest_pb2.ModelManifest, plan: bytes, entry: manifest_pb2.EngineEntry, *, device: int = 0
    ) -> None:
        self.opened.append((plan, entry.plan))
        self._graph = onnxruntime_runner(self.bundle / "model.onnx", manifest.precision)
        self._info = tensorrt_info(entry, hashlib.sha256(plan).hexdigest(), device)
        self.closed = False

    def infer(self, feed: Feed) -> Outputs:
        return self._graph.infer(feed)

    def describe(self) -> manifest_pb2.RunnerInfo:
        return self._info

    def __enter__(self) -> FakeTensorRTSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True


def test_the_tensorrt_runner_opens_the_engine_through_the_runtime_session(
    bundle_copy: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgescope.runtime.backends.tensorrt as tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "TensorRTSession", FakeTensorRTSession)
    monkeypatch.setattr(FakeTensorRTSession, "bundle", bundle_copy.path, raising=False)
    plan = bundle_copy.path / "engines" / "nvidia-h200_sm90_132sm_trt10.16.1_fp32.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"plan")
    entry = manifest_pb2.EngineEntry(
        plan="engines/" + plan.name, tensorrt_version="10.16.1.11", precision=manifest_pb2.PRECISION_FP32
    )
    with tensorrt_runner(bundle_copy, entry, device=1) as runner:
        assert runner.info == tensorrt_info(entry, sha256_file(plan), 1)
        report = self_test(bundle_copy, runner.infer, runner.info)
    assert FakeTensorRTSession.opened[-1] == (b"plan", entry.plan)
    assert report.passed and report.runner.device == "cuda:1"


@pytest.mark.gpu
def test_a_real_engine_is_gated_on_this_gpu(bundle_copy: Bundle) -> None:
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    entry = build_engine(bundle_copy, EngineOptions(max_batch=2), log=lambda _line: None)
    assert entry.self_test.passed, entry.self_test.reasons
    assert entry.self_test.runner.kind == "tensorrt" and entry.self_test.machine.gpu
    metrics = {m.name: m.value for m in entry.self_test.versus_reference.metrics}
    assert metrics["max_abs_error"] <= 1e-3 and np.isfinite(metrics["mean_abs_error"])
