"""TensorRT engine runner and its CUDA adapter.

The CPU tests check what must hold on machines without a GPU (lazy imports,
clear errors). The ``gpu`` tests need an NVIDIA GPU: the adapter ones only
cuda-python, the runner ones TensorRT as well.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgescope.bundle import Bundle, load_bundle
from edgescope.errors import MissingDependencyError

CUDA_MODULES = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")


def test_importing_the_runner_loads_neither_tensorrt_nor_cuda() -> None:
    code = (
        "import sys, edgescope.runtime.backends.tensorrt, edgescope.runtime.backends.cuda; "
        "print(sorted(m for m in ('tensorrt', 'cuda', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_missing_tensorrt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgescope.runtime.backends.tensorrt import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"TensorRT is not available: pip install 'edgescope\[tensorrt\]'"):
        TensorRTBackend()


def test_missing_cuda_python_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgescope.runtime.backends.cuda import CudaAdapter

    for name in CUDA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match="cuda-python is not available"):
        CudaAdapter()


@pytest.mark.gpu
def test_cuda_adapter_round_trip_and_graph_replay() -> None:
    pytest.importorskip("cuda")
    from edgescope.runtime.backends.cuda import CudaAdapter

    cuda = CudaAdapter(0)
    try:
        source = cuda.pinned_array((256, 256), np.float32)
        target = cuda.pinned_array((256, 256), np.float32)
        source[...] = np.arange(source.size, dtype=np.float32).reshape(source.shape)
        device = cuda.device_buffer(source.nbytes)
        cuda.to_device(device, source)
        cuda.to_host(target, device)
        cuda.synchronize()
        np.testing.assert_array_equal(target, source)

        # A captured graph replays the copy from the same addresses, reading new data.
        graph = cuda.capture_graph(lambda _stream: (cuda.to_device(device, source), cuda.to_host(target, device)))
        source *= 2
        target[...] = 0
        cuda.launch_graph(graph)
        cuda.synchronize()
        np.testing.assert_array_equal(target, source)
    finally:
        cuda.close()


@pytest.fixture
def engine_bundle(example_bundle: Bundle, tmp_path: Path) -> Bundle:
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    from edgescope.export.tensorrt.builder import EngineOptions, build_engine

    copy = tmp_path / "lesion-unet"
    shutil.copytree(example_bundle.path, copy)
    bundle = load_bundle(copy)
    build_engine(bundle, EngineOptions(precision="fp32", max_batch=4), log=lambda _line: None)
    return load_bundle(copy)


@pytest.mark.gpu
def test_tensorrt_runner_matches_onnxruntime(engine_bundle: Bundle) -> None:
    from edgescope.runtime.backends.tensorrt import TensorRTBackend

    reference = ort.InferenceSession(str(engine_bundle.onnx_path), providers=["CPUExecutionProvider"])
    input_name = engine_bundle.manifest.inputs[0].name
    with TensorRTBackend(precision="fp32").load(engine_bundle) as session:
        assert session.capabilities.device_buffers and session.capabilities.device == "cuda:0"
        # Batch 1, then a larger batch (buffers grow), then batch 1 again.
        for batch in (1, 3, 1):
            tensor = np.random.default_rng(batch).random((batch, 1, 256, 256), dtype=np.float32)
            got = session.infer({input_name: tensor})
            names = [o.name for o in reference.get_outputs()]
            expected = dict(zip(names, reference.run(names, {input_name: tensor}), strict=True))
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-3, atol=1e-3)
            assert session.inference_time > 0


def test_a_bundle_without_an_engine_for_this_gpu_is_a_device_failure_not_a_bundle_error(
    example_bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Startup stops on a bundle error but only marks the model NOT_SERVING on a backend error.
    from edgescope.engines import DeviceFacts
    from edgescope.errors import BackendError, BundleError
    from edgescope.runtime.backends import tensorrt

    monkeypatch.setattr(tensorrt, "_require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt, "device_facts", lambda _device: DeviceFacts("NVIDIA RTX A4000", (8, 6), 48, "10.16"))
    with pytest.raises(BackendError, match="no fp32 TensorRT engine for NVIDIA RTX A4000") as caught:
        tensorrt.TensorRTBackend().load(example_bundle)
    assert not isinstance(caught.value, BundleError)


class _FakeCuda:
    """Stands in for the CUDA adapter: the engine-sharing logic needs no device."""

    def __init__(self, device: int = 0) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _fake_tensorrt(deserialised: list[object], contexts: list[object]) -> object:
    """Just enough of TensorRT's Python API for a session to open and close on an engine."""
    from types import SimpleNamespace

    class Engine:
        num_io_tensors = 2
        names = ("image", "logits")

        def get_tensor_name(self, index: int) -> str:
            return self.names[index]

        def get_tensor_mode(self, name: str) -> str:
            return "input" if name == "image" else "output"

        def get_tensor_dtype(self, name: str) -> str:
            return "float"

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, 1, 64, 64)

        def create_execution_context(self) -> object:
            contexts.append(object())
            return contexts[-1]

    class Runtime:
        def __init__(self, logger: object) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> Engine:
            deserialised.append(plan)
            return Engine()

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    return SimpleNamespace(
        Logger=Logger,
        Runtime=Runtime,
        TensorIOMode=SimpleNamespace(INPUT="input"),
        nptype=lambda dtype: np.float32,
    )


def test_instances_share_one_engine_per_plan_and_device_each_with_its_own_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgescope.runtime.backends import tensorrt as backend
    from edgescope.v1 import manifest_pb2

    deserialised: list[object] = []
    contexts: list[object] = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(deserialised, contexts))
    monkeypatch.setattr(backend, "CudaAdapter", _FakeCuda)
    cache = backend.EngineCache()
    entry = manifest_pb2.EngineEntry(plan="engines/a.plan", max_batch=4)
    manifest = manifest_pb2.ModelManifest(name="m")
    first = backend.TensorRTSession(manifest, b"plan-a", entry, engines=cache)
    second = backend.TensorRTSession(manifest, b"plan-a", entry, engines=cache)
    other_device = backend.TensorRTSession(manifest, b"plan-a", entry, device=1, engines=cache)
    # One deserialisation per device, one context per session.
    assert len(deserialised) == 2 and len(contexts) == 3 and len(cache) == 2
    assert first.capabilities.max_batch == 4 and first.capabilities.dynamic_batch
    first.close()
    other_device.close()
    assert len(cache) == 1
    second.close()
    assert len(cache) == 0
    # A later session deserialises the plan again: nothing was kept past the last one.
    backend.TensorRTSession(manifest, b"plan-a", entry, engines=cache).close()
    assert len(deserialised) == 3
