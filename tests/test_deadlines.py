"""Deadlines count from capture, reach the model's queue, and are kept while a frame is at the model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread
from .hooked_backend import HookedBackend

PIXELS = encode_raw(np.full((48, 64), 90, dtype=np.uint8))
OK, DROPPED = stream_pb2.FRAME_STATUS_CODE_OK, stream_pb2.FRAME_STATUS_CODE_DROPPED
DEADLINE = stream_pb2.DROP_REASON_DEADLINE


class _SlowBackend(HookedBackend):
    """The real model, ``delay_s`` slower once ``slow`` is set; counts the frames it ran since."""

    def __init__(self) -> None:
        self.slow = threading.Event()
        self.delay_s = 0.0
        self.ran = 0
        super().__init__(self._hold)

    def _hold(self) -> None:
        if self.slow.is_set():
            self.ran += 1
            time.sleep(self.delay_s)


@pytest.fixture
def slow_server(example_bundle: Bundle) -> Iterator[tuple[ServerThread, _SlowBackend]]:
    backend = _SlowBackend()
    served = ServerThread([example_bundle.path], backend=backend)
    backend.slow.set()  # from here on: the server's own warm-up and checks are done
    try:
        yield served, backend
    finally:
        served.stop()


def _run(target: str, frames: list[stream_pb2.Frame]) -> list[tuple[stream_pb2.Result, float]]:
    async def run() -> list[tuple[stream_pb2.Result, float]]:
        async def sent() -> AsyncIterator[stream_pb2.Frame]:
            for frame in frames:
                if frame.capture_time_ns == 0:
                    frame.capture_time_ns = time.time_ns()
                yield frame

        started = time.monotonic()
        async with grpc.aio.insecure_channel(target) as channel:
            call = stream_pb2_grpc.StreamServiceStub(channel).Stream(sent(), timeout=60)
            return [(result, time.monotonic() - started) async for result in call]

    return asyncio.run(run())


def test_a_frame_that_waited_on_its_way_past_its_budget_is_dropped_unrun(
    slow_server: tuple[ServerThread, _SlowBackend],
) -> None:
    served, backend = slow_server
    now = time.time_ns()
    frames = [
        stream_pb2.Frame(stream_id="d", seq=0, raw=PIXELS, deadline_ms=500, capture_time_ns=now),
        # Captured a second before the previous frame was sent, yet arriving after it: it waited on the way.
        stream_pb2.Frame(stream_id="d", seq=1, raw=PIXELS, deadline_ms=500, capture_time_ns=now - 1_000_000_000),
    ]
    (fresh, _), (stale, _) = _run(served.target, frames)
    assert fresh.status.code == OK
    assert stale.status.code == DROPPED and stale.status.drop_reason == DEADLINE
    assert backend.ran == 1


def test_a_slow_frame_and_those_queued_behind_it_are_answered_at_their_deadline(
    slow_server: tuple[ServerThread, _SlowBackend],
) -> None:
    served, backend = slow_server
    backend.delay_s = 0.6
    frames = [stream_pb2.Frame(stream_id="q", seq=seq, raw=PIXELS, deadline_ms=150) for seq in range(5)]
    answers = _run(served.target, frames)
    assert [r.seq for r, _ in answers] == list(range(5))
    assert all(r.status.code == DROPPED and r.status.drop_reason == DEADLINE for r, _ in answers)
    # Nobody waited for the 0.6 s inference: every answer came at about its deadline.
    assert max(at for _, at in answers) < 0.45, [round(at, 3) for _, at in answers]
    # Only the first frame reached the model; the frames behind it expired in its queue, unrun.
    assert backend.ran == 1


def test_a_client_clock_offset_does_not_count_against_the_budget(server: ServerThread) -> None:
    hour_ns = 3600 * 10**9
    frames = [stream_pb2.Frame(stream_id="c", seq=seq, raw=PIXELS, deadline_ms=400) for seq in range(6)]
    for offset, frame in zip((hour_ns, -hour_ns) * 3, frames, strict=True):
        frame.capture_time_ns = time.time_ns() + offset
    ahead = _run(server.target, frames[::2])
    behind = _run(server.target, frames[1::2])
    assert all(r.status.code == OK for r, _ in ahead + behind)


def test_a_stream_keeps_its_share_of_the_model_while_another_caller_floods_it_with_calls(
    slow_server: tuple[ServerThread, _SlowBackend],
) -> None:
    served, backend = slow_server
    backend.delay_s = 0.05

    async def run() -> tuple[list[float], list[grpc.StatusCode]]:
        async with grpc.aio.insecure_channel(served.target) as flood_channel:
            flood = stream_pb2_grpc.StreamServiceStub(flood_channel)

            async def call(seq: int) -> grpc.StatusCode:
                try:
                    await flood.Infer(stream_pb2.Frame(stream_id="flood", seq=seq, raw=PIXELS), timeout=60)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            calls = [asyncio.create_task(call(seq)) for seq in range(60)]
            await asyncio.sleep(0.2)  # the model is busy with the flood now
            waits: list[float] = []
            answered = asyncio.Event()

            async def frames() -> AsyncIterator[stream_pb2.Frame]:
                for seq in range(5):
                    answered.clear()
                    waits.append(time.monotonic())
                    yield stream_pb2.Frame(stream_id="live", seq=seq, raw=PIXELS)
                    await answered.wait()

            async with grpc.aio.insecure_channel(served.target) as channel:
                async for _ in stream_pb2_grpc.StreamServiceStub(channel).Stream(frames(), timeout=60):
                    waits[-1] = time.monotonic() - waits[-1]
                    answered.set()
            return waits, list(await asyncio.gather(*calls))

    waits, codes = asyncio.run(run())
    # One lane for the flood, served in turn with the stream's: a frame waits one call, not sixty.
    assert max(waits) < 0.5, [round(w, 3) for w in waits]
    # The flood's calls wait their turn (a few at the model at once) and are all answered.
    assert codes == [grpc.StatusCode.OK] * 60
