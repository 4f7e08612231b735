"""The promises a stream makes, checked at their edges on real servers.

Every frame sent gets exactly one answer, and the right one, whatever else
happens: many streams, unary calls and KServe requests on one model while it
is reloaded; SIGTERM mid-stream; an unparseable message; clients that vanish;
a consumer that stops reading. The server's log must stay free of tracebacks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.client.demo import start_server, stop_server
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.server.registry import WorkerOptions
from edgescope.runtime.server.security import SecurityConfig
from edgescope.runtime.transport import channel_options
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

OK = stream_pb2.FRAME_STATUS_CODE_OK
DROPPED = stream_pb2.FRAME_STATUS_CODE_DROPPED
SHUTDOWN = stream_pb2.DROP_REASON_SHUTDOWN
MODEL = "lesion-unet"
RNG = np.random.default_rng(5)
PIXELS = [encode_raw((RNG.random((120, 160)) * 255).astype(np.uint8)) for _ in range(4)]


def _frame(stream_id: str, seq: int, **fields: Any) -> stream_pb2.Frame:
    return stream_pb2.Frame(stream_id=stream_id, seq=seq, model=MODEL, raw=PIXELS[seq % len(PIXELS)], **fields)


# --- no two callers in one session, whatever calls the model ---------------------------------------


class _Guarded(Session):
    """An ONNX Runtime session that fails the frame loudly if entered twice at once or from another thread."""

    backend_name = "onnxruntime"
    violations: ClassVar[list[str]] = []

    def __init__(self, inner: Session) -> None:
        super().__init__(inner.manifest)
        self._inner = inner
        self._owner = threading.get_ident()
        self._inside = threading.Lock()

    @property
    def capabilities(self) -> SessionCapabilities:
        return self._inner.capabilities

    def _infer_impl(self, feed: Feed) -> Outputs:
        if threading.get_ident() != self._owner:
            self.violations.append("called from a thread that did not open it")
        if not self._inside.acquire(blocking=False):
            self.violations.append("two callers inside one session")
            raise RuntimeError("two callers inside one session")
        try:
            return self._inner.infer(feed)
        finally:
            self._inside.release()

    def _close_impl(self) -> None:
        if threading.get_ident() != self._owner:
            self.violations.append("closed from a thread that did not open it")
        self._inner.close()


class _GuardedBackend(OnnxRuntimeBackend):
    def load(self, bundle: Bundle) -> _Guarded:  # type: ignore[override]
        return _Guarded(super().load(bundle))


def test_streams_infer_kserve_and_reloads_never_share_a_session(example_bundle: Bundle) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    _Guarded.violations.clear()
    running = ServerThread(
        [example_bundle.path],
        backend=_GuardedBackend(intra_op_threads=1, instances=2),
        models=WorkerOptions(instances=2, max_batch=4, batch_delay_s=0.002),
        security=SecurityConfig(model_repository=example_bundle.path.parent),
    )
    reference = ort.InferenceSession(str(example_bundle.onnx_path), providers=["CPUExecutionProvider"])
    tensor = RNG.random((1, 1, 256, 256), dtype=np.float32)
    (expected,) = reference.run(None, {reference.get_inputs()[0].name: tensor})
    try:

        async def stream(index: int) -> list[stream_pb2.Result]:
            async with grpc.aio.insecure_channel(running.target) as channel:
                frames = [_frame(f"s{index}", seq) for seq in range(20)]
                call = stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(frames), timeout=120)
                return [result async for result in call]

        async def unary(count: int) -> list[stream_pb2.Result]:
            async with grpc.aio.insecure_channel(running.target) as channel:
                stub = stream_pb2_grpc.StreamServiceStub(channel)
                return list(await asyncio.gather(*(stub.Infer(_frame("u", i), timeout=120) for i in range(count))))

        async def reloads() -> None:
            async with grpc.aio.insecure_channel(running.target) as channel:
                stub = stream_pb2_grpc.StreamServiceStub(channel)
                for _ in range(3):
                    await asyncio.sleep(0.2)
                    await stub.LoadModel(stream_pb2.LoadModelRequest(bundle=example_bundle.path.name), timeout=120)

        def kserve(count: int) -> list[np.ndarray[Any, Any]]:
            outputs = []
            with grpcclient.InferenceServerClient(running.target) as client:
                for _ in range(count):
                    x = grpcclient.InferInput(example_bundle.manifest.inputs[0].name, list(tensor.shape), "FP32")
                    x.set_data_from_numpy(tensor)
                    outputs.append(client.infer(MODEL, [x], client_timeout=120).as_numpy("logits"))
            return outputs

        async def everything() -> tuple[Any, ...]:
            return await asyncio.gather(
                *(stream(i) for i in range(6)), unary(20), reloads(), asyncio.to_thread(kserve, 20)
            )

        *streams, unary_results, _, kserve_outputs = asyncio.run(everything())
    finally:
        running.stop()
    assert _Guarded.violations == []
    for results in streams:
        assert [r.seq for r in results] == list(range(20))
        assert all(r.status.code == OK for r in results), [r.status.reason for r in results]
    assert all(r.status.code == OK for r in unary_results)
    for output in kserve_outputs:
        np.testing.assert_allclose(output, expected, atol=1e-5)
    # The same frame gives the same mask whichever path, instance or model version ran it.
    masks = {bytes(decode_mask(r.outputs[0].mask)) for r in unary_results if r.seq % len(PIXELS) == 0}
    masks |= {bytes(decode_mask(r.outputs[0].mask)) for s in streams for r in s if r.seq % len(PIXELS) == 0}
    assert len(masks) == 1


# --- shutdown, broken input and vanishing clients, on a server in its own process ---------------------


def _tracebacks(log: Path) -> list[str]:
    text = log.read_text(errors="replace")
    return [line for line in text.splitlines() if "Traceback" in line or "was never retrieved" in line]


@pytest.fixture
def server_process(example_bundle: Bundle, tmp_path: Path) -> Iterator[tuple[Any, str, Path]]:
    log = tmp_path / "server.log"
    server, target = start_server([example_bundle.path], tmp_path / "port", ["--grace", "10"], log=log)
    try:
        yield server, target, log
    finally:
        stop_server(server)


async def _flat_out(target: str, stream_id: str, started: asyncio.Event | None = None) -> tuple[int, list[Any], Any]:
    """Send frames as fast as the server takes them; stop sending once it says it is shutting down."""
    stop = asyncio.Event()
    sent = 0

    async def frames() -> AsyncIterator[stream_pb2.Frame]:
        nonlocal sent
        while not stop.is_set() and sent < 20_000:
            yield _frame(stream_id, sent)
            sent += 1

    async with grpc.aio.insecure_channel(target) as channel:
        call = stream_pb2_grpc.StreamServiceStub(channel).Stream(frames(), timeout=120)
        results = await _read_all(call, started, stop)
        return sent, results, (await call.code(), await call.details())


async def _read_all(
    call: Any, started: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> list[stream_pb2.Result]:
    """Every answer until the stream ends, however it ends (its status is read from the call)."""
    results: list[stream_pb2.Result] = []
    try:
        async for result in call:
            results.append(result)
            if len(results) == 20 and started is not None:
                started.set()
            if stop is not None and result.status.drop_reason == SHUTDOWN:
                stop.set()
    except grpc.aio.AioRpcError:
        pass
    return results


def test_sigterm_answers_every_sent_frame_and_says_why_streams_ended(server_process: tuple[Any, str, Path]) -> None:
    server, target, log = server_process

    async def run() -> list[tuple[int, list[Any], Any]]:
        started = [asyncio.Event() for _ in range(4)]
        streams = [asyncio.ensure_future(_flat_out(target, f"s{i}", started[i])) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        os.kill(server.pid, signal.SIGTERM)  # the server this test started
        return list(await asyncio.gather(*streams))

    outcomes = asyncio.run(run())
    assert server.wait(timeout=60) == 0
    for sent, results, (code, details) in outcomes:
        assert [r.seq for r in results] == list(range(sent)), "every frame sent has exactly one answer, in order"
        assert all(r.status.code == OK or r.status.drop_reason == SHUTDOWN for r in results)
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details, (code, details)
    assert any(r.status.drop_reason == SHUTDOWN for _, results, _ in outcomes for r in results)
    assert _tracebacks(log) == []


def test_an_unparseable_message_ends_its_stream_non_ok_after_answering_the_rest(
    server_process: tuple[Any, str, Path],
) -> None:
    _, target, log = server_process

    async def broken() -> tuple[list[stream_pb2.Result], Any]:
        async with grpc.aio.insecure_channel(target) as channel:
            stream = channel.stream_stream(
                "/edgescope.v1.StreamService/Stream",
                request_serializer=lambda raw: raw,
                response_deserializer=stream_pb2.Result.FromString,
            )

            async def messages() -> AsyncIterator[bytes]:
                for seq in range(5):
                    yield _frame("broken", seq).SerializeToString()
                yield b"\xff\xff\xff\xff not a frame"
                await asyncio.sleep(1.0)  # the server must not wait for the client to end

            call = stream(messages(), timeout=60)
            return await _read_all(call), (await call.code(), await call.details())

    async def healthy() -> list[stream_pb2.Result]:
        async with grpc.aio.insecure_channel(target) as channel:
            frames = (_frame("healthy", seq) for seq in range(30))
            return [r async for r in stream_pb2_grpc.StreamServiceStub(channel).Stream(frames, timeout=60)]

    async def both() -> tuple[Any, ...]:
        return await asyncio.gather(broken(), healthy())

    (results, (code, details)), others = asyncio.run(both())
    assert [r.seq for r in results] == list(range(5))
    assert all(r.status.code == OK for r in results)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "could not be read" in details
    assert [r.status.code for r in others] == [OK] * 30
    assert _tracebacks(log) == []


def test_clients_that_cancel_or_vanish_leave_no_trace_and_others_keep_going(
    server_process: tuple[Any, str, Path],
) -> None:
    _, target, log = server_process

    async def cancel_after(count: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            frames = (_frame("quitter", seq) for seq in range(10_000))
            call = stream_pb2_grpc.StreamServiceStub(channel).Stream(frames, timeout=60)
            async for result in call:
                if result.seq + 1 >= count:
                    call.cancel()
                    break

    async def vanish() -> None:
        # The channel closes under the call: the server sees the connection go.
        channel = grpc.aio.insecure_channel(target)
        call = stream_pb2_grpc.StreamServiceStub(channel).Stream(
            (_frame("vanish", seq) for seq in range(10_000)), timeout=60
        )
        await call.read()
        await channel.close(grace=None)

    async def steady() -> list[stream_pb2.Result]:
        async with grpc.aio.insecure_channel(target) as channel:
            frames = (_frame("steady", seq) for seq in range(60))
            return [r async for r in stream_pb2_grpc.StreamServiceStub(channel).Stream(frames, timeout=120)]

    async def run() -> list[stream_pb2.Result]:
        quitting = [cancel_after(1 + i % 5) for i in range(40)] + [vanish() for _ in range(10)]
        results, *_ = await asyncio.gather(steady(), *quitting)
        return results

    results = asyncio.run(run())
    assert [r.seq for r in results] == list(range(60))
    assert all(r.status.code == OK for r in results)
    assert _tracebacks(log) == []


# --- a consumer that stops reading ------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_a_consumer_that_never_reads_holds_bounded_memory_and_others_keep_their_answers(
    server_process: tuple[Any, str, Path],
) -> None:
    server, target, _ = server_process
    big = encode_raw(np.full((1080, 1920, 3), 90, np.uint8))  # 6 MB a frame, as 1080p endoscopy sends

    async def run() -> tuple[int, int, int, list[stream_pb2.Result]]:
        pulled = 0

        async def frames() -> AsyncIterator[stream_pb2.Frame]:
            nonlocal pulled
            for seq in range(2_000):
                pulled += 1
                yield stream_pb2.Frame(stream_id="stalled", seq=seq, model=MODEL, raw=big)

        # A fixed receive window (no bandwidth probing) makes unread answers fill it soon, as a stalled
        # display's would; gRPC's flow control then holds the answers at the server.
        options = [*channel_options(64 << 20), ("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(target, options=options) as stalled_channel:
            before = _rss_bytes(server.pid)
            # Started and never read: only gRPC's flow control lets frames in.
            call = stream_pb2_grpc.StreamServiceStub(stalled_channel).Stream(frames(), timeout=120)
            async with grpc.aio.insecure_channel(target) as channel:
                steady = (_frame("steady", seq) for seq in range(150))
                results = [r async for r in stream_pb2_grpc.StreamServiceStub(channel).Stream(steady, timeout=120)]
            peak = _rss_bytes(server.pid)
            await asyncio.sleep(2.0)  # give an unbounded server time to read on
            peak = max(peak, _rss_bytes(server.pid))
            call.cancel()
        return before, peak, pulled, results

    before, peak, pulled, results = asyncio.run(run())
    assert [r.seq for r in results] == list(range(150))
    assert all(r.status.code == OK for r in results)
    # The stream's window of a few frames, plus gRPC's buffers: far from the 2,000 frames (12 GB) offered,
    # and short of the 64 answers (384 MB of frames) an answer backlog would hold.
    assert pulled < 60, pulled
    assert peak - before < 300 << 20, f"server RSS grew {(peak - before) >> 20} MB"
