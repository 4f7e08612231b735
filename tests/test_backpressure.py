"""A stream the server is not reading holds its window of frames in the server, and little more."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.server.streams import window_frames
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread
from .hooked_backend import HookedBackend

# 256 KB a frame: gRPC's adaptive window takes 16 of them unread, the fixed one none.
BIG = encode_raw(np.full((512, 512), 90, dtype=np.uint8))
# Writes that complete no more for this long: the client is held back.
STALL_S = 1.0


def frames_taken_from_a_client_flooding_a_stalled_stream(bundle: Bundle, adaptive_window: bool) -> tuple[int, int]:
    """How many frames the client could hand over while the model was stuck, and how many were answered."""
    # Open for the load's self-test and warm-up, then every inference waits for it.
    gate = threading.Event()
    gate.set()
    served = ServerThread([bundle.path], backend=HookedBackend(lambda: gate.wait(30)), adaptive_window=adaptive_window)
    gate.clear()

    async def run() -> tuple[int, int]:
        written, stop = 0, False
        async with grpc.aio.insecure_channel(served.target) as channel:
            call = stream_pb2_grpc.StreamServiceStub(channel).Stream(timeout=60)

            async def flood() -> None:
                nonlocal written
                while not stop:
                    await call.write(stream_pb2.Frame(stream_id="flood", seq=written, raw=BIG))
                    written += 1

            writer = asyncio.create_task(flood())
            seen, still_since = -1, 0.0
            for tick in range(150):  # at most 15 s
                await asyncio.sleep(0.1)
                if written != seen:
                    seen, still_since = written, tick * 0.1
                elif tick * 0.1 - still_since >= STALL_S:
                    break
            taken, stop = written, True
            # Cancelling a write would cancel the call: the one under way completes once the model is free.
            gate.set()
            await asyncio.wait_for(writer, 30)
            await call.done_writing()
            answered = 0
            while await asyncio.wait_for(call.read(), 30) is not grpc.aio.EOF:
                answered += 1
            return taken, answered

    try:
        return asyncio.run(run())
    finally:
        gate.set()
        served.stop()


@pytest.mark.parametrize("adaptive_window", [False, True], ids=["fixed window", "adaptive window"])
def test_a_stalled_stream_holds_its_window_of_frames_in_the_server_unless_the_window_adapts(
    example_bundle: Bundle, adaptive_window: bool
) -> None:
    taken, answered = frames_taken_from_a_client_flooding_a_stalled_stream(example_bundle, adaptive_window)
    window = window_frames(1)
    # Every frame the client handed over is answered once the model is free.
    assert answered >= taken
    if adaptive_window:
        # gRPC's own window (4 MB and up) takes frames the stream has not read: the contrast.
        assert taken >= window + 8, taken
    else:
        # The stream's window, and at most the frame that is partly across.
        assert taken <= window + 1, taken
