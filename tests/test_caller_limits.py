"""Nothing a caller sends can stall a stream, the server, or its stop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from edgescope.bundle import Bundle
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.pipeline.decode import MAX_NAME_CHARS, encode_raw
from edgescope.runtime.server.admission import STREAMS_PER_CLIENT
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread
from .hooked_backend import HookedBackend

PIXELS = encode_raw(np.full((48, 64), 90, dtype=np.uint8))
OK, ERROR = stream_pb2.FRAME_STATUS_CODE_OK, stream_pb2.FRAME_STATUS_CODE_ERROR


def test_a_megabyte_stream_id_is_refused_as_it_is_read_and_the_stream_goes_on(server: ServerThread) -> None:
    async def run() -> list[tuple[stream_pb2.Result, float]]:
        async def frames() -> AsyncIterator[stream_pb2.Frame]:
            yield stream_pb2.Frame(stream_id="s" * (1 << 20), seq=0, raw=PIXELS)
            yield stream_pb2.Frame(stream_id="ok", seq=1, raw=PIXELS)

        started = time.monotonic()
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = stream_pb2_grpc.StreamServiceStub(channel).Stream(frames(), timeout=30)
            return [(result, time.monotonic() - started) async for result in call]

    (refused, refused_at), (good, _) = asyncio.run(run())
    assert refused.status.code == ERROR and f"at most {MAX_NAME_CHARS}" in refused.status.reason
    # The answer echoes a cut id, not the megabyte.
    assert len(refused.stream_id) == MAX_NAME_CHARS and refused.ByteSize() < 2048
    assert refused_at < 1.0
    assert good.status.code == OK and good.stream_id == "ok"


def test_a_client_holding_its_most_streams_is_refused_another_until_one_closes(server: ServerThread) -> None:
    async def run() -> tuple[grpc.StatusCode, str, int]:
        release = asyncio.Event()

        async def held(seq: int) -> AsyncIterator[stream_pb2.Frame]:
            yield stream_pb2.Frame(stream_id=f"held-{seq}", seq=0, raw=PIXELS)
            await release.wait()

        async def quiet() -> AsyncIterator[stream_pb2.Frame]:
            await release.wait()
            yield stream_pb2.Frame(stream_id="refused", seq=0, raw=PIXELS)

        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            calls = [stub.Stream(held(i), timeout=30) for i in range(STREAMS_PER_CLIENT)]
            for call in calls:  # each is open once its first answer is back
                await asyncio.wait_for(call.read(), 20)
            # Sends nothing until released: a frame in flight as the server ends the call can read as INTERNAL.
            refused = stub.Stream(quiet(), timeout=30)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await asyncio.wait_for(refused.read(), 20)
            code, details = await refused.code(), await refused.details()
            calls[0].cancel()
            await asyncio.sleep(0.2)
            again = stub.Stream(held(100), timeout=30)
            answer = await asyncio.wait_for(again.read(), 20)
            release.set()
            for call in [*calls[1:], again]:
                while await asyncio.wait_for(call.read(), 20) is not grpc.aio.EOF:
                    pass
            return code, details, answer.status.code

    code, details, answer = asyncio.run(run())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"{STREAMS_PER_CLIENT} streams open" in details, details
    assert answer == OK


class _HangingBackend(HookedBackend):
    """Serves normally until ``hang`` is set; then every inference blocks for a minute."""

    def __init__(self) -> None:
        self.hang = threading.Event()
        super().__init__(self._hold)

    def _hold(self) -> None:
        if self.hang.is_set():
            time.sleep(60)


def test_a_hung_model_cannot_hold_the_stop_past_the_grace_period(example_bundle: Bundle) -> None:
    backend = _HangingBackend()
    served = ServerThread([example_bundle.path], backend=backend)
    backend.hang.set()
    with grpc.insecure_channel(served.target) as channel:
        pending = stream_pb2_grpc.StreamServiceStub(channel).Infer.future(
            stream_pb2.Frame(stream_id="stuck", raw=PIXELS), timeout=60
        )
        time.sleep(0.3)  # the frame is inside the model now
        started = time.monotonic()
        served.stop()  # a grace of 1 s
        took = time.monotonic() - started
        # The stuck call ends with the server, not a minute later.
        assert pending.exception(timeout=5) is not None
    assert took < 1.0 + 2.0 + 0.5, f"the stop took {took:.1f} s"


def test_a_server_that_cannot_bind_leaves_no_model_running(example_bundle: Bundle) -> None:
    import socket

    from edgescope.runtime.server.app import ServerConfig, start_server

    # Another test's hung model may still be sleeping in its thread: only threads made here count.
    before = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServerConfig(bundles=[example_bundle.path], host="127.0.0.1", port=port)

        async def start() -> None:
            await start_server(config, OnnxRuntimeBackend(intra_op_threads=1, spinning="off"))

        try:
            asyncio.run(start())
        except Exception:  # grpc reports the bind failure in its own way, or edgescope's OSError
            pass
        else:
            raise AssertionError("the server started on a port already taken")
    deadline = time.monotonic() + 10
    while any(t.name.startswith("edgescope-lesion-unet") for t in set(threading.enumerate()) - before):
        assert time.monotonic() < deadline, "the model's instance threads outlived the failed start"
        time.sleep(0.05)
