"""Shared fixtures: the example bundle (exported once) and a real server on loopback."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.archive.local_orthanc import LocalOrthanc, orthanc_missing
from edgescope.v1 import manifest_pb2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ultrasound_unet"


def _nvml_gpu_present() -> bool:
    from edgescope.runtime.telemetry.gpu import NvmlSampler

    sampler = NvmlSampler()
    try:
        return sampler.status.available
    finally:
        sampler.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items) or _nvml_gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with a driver (NVML found none)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@contextmanager
def onnxruntime_engine(bundle: Bundle, entry: manifest_pb2.EngineEntry, *, device: int = 0) -> Iterator[Any]:
    """Stands in for a built TensorRT engine: the bundle's graph in ONNX Runtime, described as the engine."""
    from edgescope.runtime.evaluation import Runner, onnxruntime_runner, tensorrt_info

    runner = onnxruntime_runner(bundle.onnx_path, bundle.manifest.precision)
    yield Runner(runner.infer, tensorrt_info(entry, "", device))


@pytest.fixture(scope="session")
def example_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The example lesion U-Net exported through the public API, as users do.

    Where torch is absent (Python 3.10 on JetPack 6), ``EDGESCOPE_TEST_BUNDLE`` names a bundle
    exported elsewhere, so the runtime's tests still run.
    """
    exported = os.environ.get("EDGESCOPE_TEST_BUNDLE")
    if exported:
        from edgescope.bundle import load_bundle

        return load_bundle(Path(exported).resolve())
    pytest.importorskip("torch")
    from edgescope.export import ExportRequest, export_model

    out = tmp_path_factory.mktemp("bundles") / "lesion-unet"
    return export_model(
        ExportRequest(
            name="lesion-unet",
            output=out,
            factory=str(EXAMPLE / "model.py") + ":build",
            weights=EXAMPLE / "weights.pt",
            samples=4,
        ),
        log=lambda _line: None,
    )


class ServerThread:
    """A real grpc.aio server on 127.0.0.1, on its own event loop in a thread."""

    def __init__(self, bundles: list[Path], backend: Any = None, **config_fields: Any) -> None:
        from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
        from edgescope.runtime.server.app import RunningServer, ServerConfig, start_server

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        config = ServerConfig(bundles=bundles, host="127.0.0.1", port=0, frame_threads=2, **config_fields)
        started: Future[RunningServer] = asyncio.run_coroutine_threadsafe(
            start_server(config, backend or OnnxRuntimeBackend(intra_op_threads=1)), self._loop
        )
        self.running = started.result(timeout=60)
        self.target = f"127.0.0.1:{self.running.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(1.0), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture(scope="module")
def server(example_bundle: Bundle) -> Iterator[ServerThread]:
    """The example bundle served; LoadModel finds bundles beside it (its folder is the model repository)."""
    from edgescope.runtime.server.security import SecurityConfig

    running = ServerThread([example_bundle.path], security=SecurityConfig(model_repository=example_bundle.path.parent))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[LocalOrthanc]:
    """A real Orthanc (DICOMweb and DICOM) on free loopback ports, with its own storage; skipped without it."""
    if orthanc_missing():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (Debian: orthanc orthanc-dicomweb)")
    running = LocalOrthanc.on_free_ports(tmp_path / "orthanc")
    running.start()
    try:
        yield running
    finally:
        running.stop()
