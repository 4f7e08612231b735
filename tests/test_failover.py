"""Degraded mode: a backend that fails on command, a fallback that takes over, and the way back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.errors import BackendError
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.server import failover
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

OK = stream_pb2.FRAME_STATUS_CODE_OK
ERROR = stream_pb2.FRAME_STATUS_CODE_ERROR
DEGRADED = stream_pb2.Alert.KIND_MODEL_DEGRADED
PLAIN = encode_raw(np.full((120, 160), 90, np.uint8))
# A frame no backend here can run: both fail on it, so it is the frame's fault, not a device's.
POISON = encode_raw(np.full((120, 160), 7, np.uint8))


class _Failing(Session):
    """Runs ONNX Runtime, but fails like a lost GPU while its backend is broken, and always on POISON."""

    def __init__(self, inner: Session, backend: FailingBackend) -> None:
        super().__init__(inner.manifest)
        self._inner = inner
        self._backend = backend
        self.backend_name = backend.name

    @property
    def capabilities(self) -> SessionCapabilities:
        return self._inner.capabilities

    def _infer_impl(self, feed: Feed) -> Outputs:
        if self._backend.broken.is_set():
            raise BackendError("CUDA error 999: unspecified launch failure (simulated)")
        if any(np.allclose(np.asarray(v), 7 / 255, atol=1e-4) for v in feed.values()):
            raise BackendError("cannot run this frame (simulated)")
        return self._inner.infer(feed)

    def _close_impl(self) -> None:
        self._inner.close()


class FailingBackend(OnnxRuntimeBackend):
    """A backend that fails on command: ``broken.set()`` and every load and inference fails."""

    def __init__(self, name: str) -> None:
        super().__init__(intra_op_threads=1)
        self.name = name
        self.broken = threading.Event()

    def load(self, bundle: Bundle) -> _Failing:  # type: ignore[override]
        if self.broken.is_set():
            raise BackendError("no CUDA device (simulated)")
        return _Failing(super().load(bundle), self)


@pytest.fixture
def primary() -> FailingBackend:
    return FailingBackend("gpu-like")


@pytest.fixture
def served(example_bundle: Bundle, primary: FailingBackend, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    monkeypatch.setattr(failover, "FIRST_RETRY_S", 0.5)
    running = ServerThread([example_bundle.path], backend=primary, fallback=FailingBackend("cpu-like"))
    try:
        yield running
    finally:
        running.stop()


def _infer(stub: stream_pb2_grpc.StreamServiceStub, pixels: stream_pb2.RawImage, seq: int = 0) -> stream_pb2.Result:
    return stub.Infer(stream_pb2.Frame(stream_id="f", seq=seq, model="lesion-unet", raw=pixels), timeout=60)


def test_a_failing_primary_hands_over_to_the_fallback_and_comes_back(
    served: ServerThread, primary: FailingBackend
) -> None:
    with grpc.insecure_channel(served.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        healthy = _infer(stub, PLAIN)
        assert healthy.status.code == OK
        assert healthy.provenance.backend == "gpu-like" and not healthy.provenance.degraded

        primary.broken.set()
        degraded = [_infer(stub, PLAIN, seq) for seq in range(1, 4)]
        for result in degraded:
            assert result.status.code == OK, result.status.reason
            assert result.provenance.backend == "cpu-like" and result.provenance.degraded
            assert "CUDA error 999" in result.provenance.degraded_reason
            assert DEGRADED in [a.kind for a in result.alerts]
        # The answer is the same model's: the fallback passed the same checks.
        assert degraded[0].outputs == healthy.outputs
        (info,) = [m for m in stub.ListModels(stream_pb2.ListModelsRequest(), timeout=10).models if m.ready]
        assert info.provenance.degraded
        assert served.running.telemetry is not None
        assert DEGRADED in [a.kind for a in served.running.telemetry.metrics.active_alerts()]

        # While broken, rebuilding the primary fails and backs off; once it works again, it serves.
        primary.broken.clear()
        deadline = time.monotonic() + 30
        result = _infer(stub, PLAIN, 10)
        while result.provenance.degraded and time.monotonic() < deadline:
            time.sleep(0.2)
            result = _infer(stub, PLAIN, 11)
        assert not result.provenance.degraded and result.provenance.backend == "gpu-like"
        assert DEGRADED not in [a.kind for a in served.running.telemetry.metrics.active_alerts()]


def test_a_frame_that_fails_everywhere_fails_alone_and_degrades_nothing(served: ServerThread) -> None:
    async def run() -> list[stream_pb2.Result]:
        async with grpc.aio.insecure_channel(served.target) as channel:
            frames = [
                stream_pb2.Frame(stream_id="p", seq=seq, model="lesion-unet", raw=POISON if seq == 2 else PLAIN)
                for seq in range(5)
            ]
            return [r async for r in stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(frames), timeout=60)]

    results = asyncio.run(run())
    assert [r.status.code for r in results] == [OK, OK, ERROR, OK, OK]
    assert "cannot run this frame" in results[2].status.reason
    assert not any(r.provenance.degraded for r in results)
