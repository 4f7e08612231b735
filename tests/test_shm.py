"""Shared-memory frames: the region registry, and streams through a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.errors import FrameError
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.pipeline.decode import decode_frame, encode_raw, raw_layout
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.server.shm import REGIONS, SharedMemoryRegistry
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

OK = stream_pb2.FRAME_STATUS_CODE_OK
ERROR = stream_pb2.FRAME_STATUS_CODE_ERROR


@pytest.fixture
def segment() -> Iterator[shared_memory.SharedMemory]:
    region = shared_memory.SharedMemory(create=True, size=4 * 1000)
    try:
        yield region
    finally:
        region.close()
        region.unlink()


def _ref(region: str, slot: int = 0, offset: int = 0, size: int = 600) -> stream_pb2.SharedMemoryFrame:
    layout = raw_layout(np.zeros((20, 30), dtype=np.uint8))
    return stream_pb2.SharedMemoryFrame(region=region, slot=slot, offset=offset, size=size, image=layout)


def test_registry_reads_the_slot_in_place(segment: shared_memory.SharedMemory) -> None:
    registry = SharedMemoryRegistry()
    registry.register(segment.name, slot_count=4, slot_bytes=1000)
    pixels = np.arange(600, dtype=np.uint32).astype(np.uint8).reshape(20, 30)
    segment.buf[2000 + 8 : 2000 + 608] = pixels.tobytes()
    view = registry.view(_ref(segment.name, slot=2, offset=8))
    np.testing.assert_array_equal(np.frombuffer(view, dtype=np.uint8).reshape(20, 30), pixels)
    # Read-only: the server cannot scribble on the client's frames.
    with pytest.raises(TypeError):
        view[0] = 1
    view.release()
    registry.close()


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        (dict(slot=4), "slot 4 is outside"),
        (dict(offset=500), "runs past the end"),
        (dict(size=1001), "runs past the end"),
        (dict(size=0), "size is 0"),
    ],
)
def test_registry_refuses_out_of_bounds_frames(
    segment: shared_memory.SharedMemory, ref: dict[str, int], reason: str
) -> None:
    registry = SharedMemoryRegistry()
    registry.register(segment.name, slot_count=4, slot_bytes=1000)
    with pytest.raises(FrameError, match=reason):
        registry.view(_ref(segment.name, **ref))
    registry.close()


def test_registry_refuses_bad_registrations(segment: shared_memory.SharedMemory) -> None:
    registry = SharedMemoryRegistry()
    with pytest.raises(FrameError, match="does not exist"):
        registry.register("edgescope-no-such-region", 1, 10)
    with pytest.raises(FrameError, match="not a shared-memory region name"):
        registry.register("../etc/passwd", 1, 10)
    with pytest.raises(FrameError, match="its slots need"):
        registry.register(segment.name, slot_count=5, slot_bytes=1000)
    registry.register(segment.name, 4, 1000)
    with pytest.raises(FrameError, match="already registered"):
        registry.register(segment.name, 4, 1000)
    registry.close()


def test_unregister_and_stream_end_unmap(segment: shared_memory.SharedMemory) -> None:
    registry = SharedMemoryRegistry()
    registry.register(segment.name, 4, 1000, stream_id="s1")
    in_flight = np.frombuffer(registry.view(_ref(segment.name)), dtype=np.uint8)
    registry.release_stream("other")
    assert registry.names() == [segment.name]
    registry.release_stream("s1")
    assert registry.names() == []
    # A frame still being processed keeps its pixels readable.
    assert in_flight.shape == (600,) and int(in_flight.sum()) >= 0
    with pytest.raises(FrameError, match="not registered"):
        registry.view(_ref(segment.name))
    registry.register(segment.name, 4, 1000)
    registry.unregister(segment.name)
    with pytest.raises(FrameError, match="not registered"):
        registry.unregister(segment.name)


def test_decode_frame_reads_shared_memory_like_raw_bytes(segment: shared_memory.SharedMemory) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (10, 20, 3), dtype=np.uint8)
    segment.buf[1000 : 1000 + pixels.nbytes] = pixels.tobytes()
    REGIONS.register(segment.name, 4, 1000)
    try:
        frame = stream_pb2.Frame(
            shm=stream_pb2.SharedMemoryFrame(
                region=segment.name, slot=1, offset=0, size=pixels.nbytes, image=raw_layout(pixels)
            )
        )
        np.testing.assert_array_equal(
            decode_frame(frame, REGIONS.view), decode_frame(stream_pb2.Frame(raw=encode_raw(pixels)))
        )
        frame.shm.size -= 1
        with pytest.raises(FrameError, match="needs 600"):
            decode_frame(frame, REGIONS.view)
    finally:
        REGIONS.unregister(segment.name)


@pytest.fixture(scope="module")
def shm_server(example_bundle: Bundle) -> Iterator[ServerThread]:
    running = ServerThread([example_bundle.path])
    try:
        yield running
    finally:
        running.stop()
    assert REGIONS.names() == []


def _stream(target: str, shared: bool) -> list[stream_pb2.Result]:
    results: list[stream_pb2.Result] = []
    options = StreamOptions(
        target=target,
        model="lesion-unet",
        realtime=False,
        timeout_s=60,
        shared_memory=shared,
        shared_memory_slots=2,
        policy=stream_pb2.STREAM_POLICY_EVERY,
    )
    source = SyntheticUltrasoundSource(seed=9, n_frames=8)
    asyncio.run(stream_source(source, options, lambda _f, r: results.append(r)))
    return results


def test_frames_through_shared_memory_match_frames_as_bytes(shm_server: ServerThread) -> None:
    via_shm = _stream(shm_server.target, shared=True)
    via_bytes = _stream(shm_server.target, shared=False)
    assert [r.status.code for r in via_shm] == [OK] * 8, [r.status.reason for r in via_shm]
    for a, b in zip(via_shm, via_bytes, strict=True):
        np.testing.assert_array_equal(decode_mask(a.outputs[0].mask), decode_mask(b.outputs[0].mask))
        assert list(a.quantities) == list(b.quantities)
    # The client unregistered its ring when the stream ended.
    assert REGIONS.names() == []


def test_bad_shared_memory_frames_get_errors_and_the_stream_goes_on(
    shm_server: ServerThread, segment: shared_memory.SharedMemory
) -> None:
    pixels = np.full((20, 30), 90, dtype=np.uint8)
    segment.buf[: pixels.nbytes] = pixels.tobytes()

    def frame(seq: int, **ref: int | str) -> stream_pb2.Frame:
        fields: dict[str, int | str] = {"region": segment.name, "slot": 0, "offset": 0, "size": pixels.nbytes}
        fields.update(ref)
        shm = stream_pb2.SharedMemoryFrame(image=raw_layout(pixels), **fields)
        return stream_pb2.Frame(stream_id="bad-shm", seq=seq, model="lesion-unet", shm=shm)

    frames = [
        frame(0),
        frame(1, slot=9),
        frame(2, offset=999),
        frame(3, size=10),
        frame(4, region="not-registered"),
        frame(5),
    ]
    with grpc.insecure_channel(shm_server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        stub.RegisterSharedMemory(
            stream_pb2.RegisterSharedMemoryRequest(region=segment.name, slot_count=4, slot_bytes=1000), timeout=10
        )
        results = list(stub.Stream(iter(frames), timeout=60))
        with pytest.raises(grpc.RpcError) as missing:
            stub.RegisterSharedMemory(
                stream_pb2.RegisterSharedMemoryRequest(region="edgescope-nope", slot_count=1, slot_bytes=8), timeout=10
            )
        assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.UnregisterSharedMemory(stream_pb2.UnregisterSharedMemoryRequest(region=segment.name), timeout=10)
    assert [r.seq for r in results] == list(range(6))
    assert [r.status.code for r in results] == [OK, ERROR, ERROR, ERROR, ERROR, OK]
    assert "slot 9 is outside" in results[1].status.reason
    assert "runs past the end" in results[2].status.reason
    assert "needs 600" in results[3].status.reason
    assert "not registered" in results[4].status.reason
