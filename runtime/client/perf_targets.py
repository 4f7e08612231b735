"""The two protocols ``edgescope perf`` loads a server over, one request per call.

``KServeTarget`` resends one ModelInfer request of random tensors shaped from
the model's metadata; ``StreamTarget`` sends frames of a source on edgescope's
Stream call, one bidirectional stream per lane, every frame answered in order.
An error answer raises ``RequestFailed``: counted, and the load goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
import numpy as np

from edgescope.errors import ConfigError
from edgescope.kserve.datatypes import NUMPY_DTYPES
from edgescope.kserve.v2 import inference_pb2 as kserve
from edgescope.kserve.v2 import inference_pb2_grpc as kserve_grpc
from edgescope.runtime.client.perf_options import PerfError, PerfOptions, RequestFailed
from edgescope.runtime.pipeline.decode import encode_raw_into
from edgescope.v1 import stream_pb2, stream_pb2_grpc


class Target(Protocol):
    async def request(self, lane: int) -> None: ...

    async def close(self) -> None: ...


class KServeTarget:
    """ModelInfer with one prepared request, resent as is."""

    def __init__(self, channel: grpc.aio.Channel, options: PerfOptions) -> None:
        self._stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        self._options = options
        self._request = kserve.ModelInferRequest(model_name=options.model)

    async def prepare(self) -> None:
        try:
            metadata = await self._stub.ModelMetadata(
                kserve.ModelMetadataRequest(name=self._options.model), timeout=self._options.request_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise PerfError(
                f"ModelMetadata for {self._options.model!r} failed: {exc.code().name}: {exc.details()}"
            ) from exc
        rng = np.random.default_rng(self._options.seed)
        for tensor in metadata.inputs:
            shape = self._shape(tensor)
            dtype = NUMPY_DTYPES.get(tensor.datatype)
            if dtype is None:
                raise PerfError(f"input {tensor.name!r} has datatype {tensor.datatype}, which perf cannot generate")
            values = rng.random(shape) if dtype.kind == "f" else rng.integers(0, 2 if dtype.kind == "b" else 100, shape)
            self._request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
            self._request.raw_input_contents.append(
                np.ascontiguousarray(values, dtype=dtype.newbyteorder("<")).tobytes()
            )

    def _shape(self, tensor: kserve.ModelMetadataResponse.TensorMetadata) -> list[int]:
        given = self._options.shapes.get(tensor.name)
        dims = list(tensor.shape)
        if given is not None:
            if len(given) != len(dims) - 1:
                raise ConfigError(f"--shape {tensor.name}: give {len(dims) - 1} sizes (all but the batch), not {given}")
            return [self._options.batch_size, *given]
        shape = [self._options.batch_size if index == 0 and dim < 0 else dim for index, dim in enumerate(dims)]
        if any(dim < 0 for dim in shape):
            raise ConfigError(
                f"input {tensor.name!r} has dynamic dimensions {dims}; give their sizes with "
                f"--shape {tensor.name}:{','.join('H' if d < 0 else str(d) for d in dims[1:])}"
            )
        return shape

    async def request(self, lane: int) -> None:
        try:
            await self._stub.ModelInfer(self._request, timeout=self._options.request_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(f"{exc.code().name}: {exc.details()}") from exc

    async def statistics(self) -> kserve.ModelStatistics | None:
        try:
            response = await self._stub.ModelStatistics(
                kserve.ModelStatisticsRequest(name=self._options.model), timeout=self._options.request_timeout_s
            )
        except grpc.aio.AioRpcError:
            return None  # an older or non-edgescope server: client-side figures only
        return response.model_stats[0] if response.model_stats else None

    async def close(self) -> None:
        return None


class _StreamLane:
    """One bidirectional Stream: frames go in, answers come back in order and resolve their senders."""

    def __init__(
        self,
        stub: stream_pb2_grpc.StreamServiceAsyncStub,
        options: PerfOptions,
        frames: list[stream_pb2.Frame],
        lane: int,
    ) -> None:
        self._options = options
        self._frames = frames
        self._id = f"perf-{lane}"
        self._seq = itertools.count()
        self._pending: dict[int, asyncio.Future[stream_pb2.Result]] = {}
        self._outgoing: asyncio.Queue[stream_pb2.Frame | None] = asyncio.Queue()
        self._call = stub.Stream(self._frames_out())
        self._reader = asyncio.create_task(self._read())

    async def _frames_out(self) -> AsyncIterator[stream_pb2.Frame]:
        while (frame := await self._outgoing.get()) is not None:
            yield frame

    async def _read(self) -> None:
        failure: BaseException = RequestFailed("the stream ended")
        try:
            async for result in self._call:
                future = self._pending.pop(result.seq, None)
                if future is not None and not future.done():
                    future.set_result(result)
        except grpc.aio.AioRpcError as exc:
            failure = RequestFailed(f"stream closed: {exc.code().name}: {exc.details()}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(failure)
        self._pending.clear()

    async def request(self) -> None:
        seq = next(self._seq)
        future: asyncio.Future[stream_pb2.Result] = asyncio.get_running_loop().create_future()
        self._pending[seq] = future
        # The source's pixels and what describes them (spacing, regions, DICOM pixel transform).
        frame = stream_pb2.Frame()
        frame.CopyFrom(self._frames[seq % len(self._frames)])
        frame.stream_id, frame.seq, frame.model = self._id, seq, self._options.model
        frame.capture_time_ns, frame.policy = time.time_ns(), stream_pb2.STREAM_POLICY_EVERY
        await self._outgoing.put(frame)
        try:
            result = await asyncio.wait_for(future, self._options.request_timeout_s)
        except asyncio.TimeoutError as exc:
            raise RequestFailed(f"no answer within {self._options.request_timeout_s} s") from exc
        if result.status.code != stream_pb2.FRAME_STATUS_CODE_OK:
            code = stream_pb2.FrameStatusCode.Name(result.status.code).removeprefix("FRAME_STATUS_CODE_")
            raise RequestFailed(f"{code}: {result.status.reason}")

    async def close(self) -> None:
        await self._outgoing.put(None)
        try:
            await asyncio.wait_for(self._reader, self._options.request_timeout_s)
        except asyncio.TimeoutError:
            self._call.cancel()


class StreamTarget:
    def __init__(self, channel: grpc.aio.Channel, options: PerfOptions, frames: list[stream_pb2.Frame]) -> None:
        self._stub = stream_pb2_grpc.StreamServiceStub(channel)
        self._options = options
        self._frames = frames
        self._lanes: dict[int, _StreamLane] = {}

    async def request(self, lane: int) -> None:
        stream = self._lanes.get(lane)
        if stream is None:
            stream = self._lanes[lane] = _StreamLane(self._stub, self._options, self._frames, lane)
        await stream.request()

    async def close(self) -> None:
        lanes, self._lanes = list(self._lanes.values()), {}
        await asyncio.gather(*(lane.close() for lane in lanes))


def source_frames(spec: str, count: int = 8) -> list[stream_pb2.Frame]:
    """Frames of the source as a client streams them, less their identity (set per request)."""
    from edgescope.runtime.sources import open_source

    frames = []
    with open_source(spec, loop=True) as source:
        for source_frame in itertools.islice(source, count):
            frame = stream_pb2.Frame()
            encode_raw_into(frame.raw, source_frame.pixels)
            source_frame.describe(frame)
            frames.append(frame)
    if not frames:
        raise PerfError(f"the source {spec} gave no frames")
    return frames
