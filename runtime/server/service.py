"""The gRPC servicer: Stream, Infer, ListModels, GetModel, LoadModel, UnloadModel, Subscribe.

Handlers never run model code on the event loop. A stream is scheduled by
``StreamScheduler`` (live/every policies, deadlines, overlapped stages); a
frame that fails gets an error result and the stream goes on. A unary call
that fails is aborted with the mapped status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import Executor

import grpc

from edgescope.errors import EdgescopeError, ModelNotFoundError
from edgescope.runtime.backends.base import Backend
from edgescope.runtime.pipeline.state import is_stateful
from edgescope.runtime.server.capture import CaptureHub
from edgescope.runtime.server.processing import process_frame
from edgescope.runtime.server.registry import LoadedModel, ModelRegistry
from edgescope.runtime.server.repository import ModelRepository
from edgescope.runtime.server.shm import REGIONS, SharedMemoryServicer
from edgescope.runtime.server.status import status_code_for
from edgescope.runtime.server.streams import ModelBatcher, SchedulerConfig, StreamScheduler
from edgescope.runtime.telemetry.metrics import RuntimeMetrics
from edgescope.v1 import stream_pb2, stream_pb2_grpc

logger = logging.getLogger(__name__)


def _model_info(model: LoadedModel) -> stream_pb2.ModelInfo:
    return stream_pb2.ModelInfo(name=model.name, manifest=model.manifest, backend=model.provenance.backend, ready=True)


class StreamService(SharedMemoryServicer, stream_pb2_grpc.StreamServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        executor: Executor,
        backend: Backend,
        config: SchedulerConfig,
        metrics: RuntimeMetrics | None = None,
        repository: ModelRepository | None = None,
    ) -> None:
        self._registry = registry
        # Where LoadModel finds bundles, and the policy they must meet; no root: LoadModel is refused.
        self._repository = repository or ModelRepository(None)
        self._metrics = metrics or RuntimeMetrics()
        self._executor = executor
        self._backend = backend
        self._config = config
        self._captures: CaptureHub | None = None
        self._batchers: dict[int, ModelBatcher] = {}
        self.draining = asyncio.Event()
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def attach_captures(self, captures: CaptureHub | None) -> None:
        self._captures = captures

    def scheduler(self) -> StreamScheduler:
        return StreamScheduler(self._registry, self._executor, self._config, self._batcher_for, self.draining)

    def _batcher_for(self, model: LoadedModel) -> ModelBatcher | None:
        if (
            self._config.max_batch <= 1
            or not model.session.capabilities.dynamic_batch
            or is_stateful(model.manifest)  # each stream's state is its own: no cross-stream batch
        ):
            return None
        try:
            if self._registry.get(model.name) is not model:
                return None  # retired by a reload: finish its frames unbatched
        except ModelNotFoundError:
            return None
        batcher = self._batchers.get(id(model))
        if batcher is None:
            batcher = ModelBatcher(model, self._executor, self._config.max_batch, self._config.max_batch_delay_s)
            self._batchers[id(model)] = batcher
        return batcher

    def batch_stats(self) -> dict[str, tuple[int, int]]:
        """Model name -> (batches run, frames in them) for the current batchers."""
        return {b.model.name: (b.batches, b.items) for b in self._batchers.values()}

    def _retire_stale_batchers(self) -> None:
        current = {id(m) for m in self._registry.all()}
        for key in [k for k in self._batchers if k not in current]:
            self._batchers.pop(key).retire()

    async def drain(self, timeout_s: float) -> bool:
        """Stop reading new frames, answer every frame already received; True if all streams ended."""
        self.draining.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        self._batchers.clear()

    async def Stream(
        self,
        request_iterator: AsyncIterable[stream_pb2.Frame],
        context: grpc.aio.ServicerContext[stream_pb2.Frame, stream_pb2.Result],
    ) -> AsyncIterator[stream_pb2.Result]:
        if self.draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        self._active += 1
        self._idle.clear()
        tap = self._metrics.tap()
        stream_ids: set[str] = set()

        async def remember(frames: AsyncIterable[stream_pb2.Frame]) -> AsyncIterator[stream_pb2.Frame]:
            async for frame in frames:
                stream_ids.add(frame.stream_id)
                yield frame

        try:
            async for result in self.scheduler().run(tap.frames(remember(request_iterator))):
                yield tap.observe(result)
        finally:
            # A client that crashed never unregisters its ring; unmap it with its stream.
            for stream_id in stream_ids:
                REGIONS.release_stream(stream_id)
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def Infer(
        self,
        request: stream_pb2.Frame,
        context: grpc.aio.ServicerContext[stream_pb2.Frame, stream_pb2.Result],
    ) -> stream_pb2.Result:
        loop = asyncio.get_running_loop()
        received = time.perf_counter_ns()
        try:
            result = await loop.run_in_executor(
                self._executor,
                process_frame,
                self._registry,
                request,
                request.model,
                received,
                self._config.frame_limits,
            )
            self._metrics.observe_result(request.model, request.stream_id, result, request, received)
            return result
        except EdgescopeError as exc:
            await context.abort(status_code_for(exc), str(exc))
        except Exception as exc:
            logger.exception("Infer failed unexpectedly")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    async def ListModels(
        self,
        request: stream_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[stream_pb2.ListModelsRequest, stream_pb2.ListModelsResponse],
    ) -> stream_pb2.ListModelsResponse:
        return stream_pb2.ListModelsResponse(models=[_model_info(m) for m in self._registry.all()])

    async def GetModel(
        self,
        request: stream_pb2.GetModelRequest,
        context: grpc.aio.ServicerContext[stream_pb2.GetModelRequest, stream_pb2.ModelInfo],
    ) -> stream_pb2.ModelInfo:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "GetModel needs a model name")
        try:
            return _model_info(self._registry.get(request.name))
        except ModelNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def LoadModel(
        self,
        request: stream_pb2.LoadModelRequest,
        context: grpc.aio.ServicerContext[stream_pb2.LoadModelRequest, stream_pb2.ModelInfo],
    ) -> stream_pb2.ModelInfo:
        if not request.bundle:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "LoadModel needs a bundle name")
        loop = asyncio.get_running_loop()

        def load() -> LoadedModel:
            # Loading and warm-up happen before the swap: streams keep running meanwhile.
            path = self._repository.resolve(request.bundle)
            return self._registry.load(
                path, self._backend, name=request.name or None, policy=self._repository.policy, replace=True
            )

        try:
            model = await loop.run_in_executor(self._executor, load)
        except EdgescopeError as exc:
            await context.abort(status_code_for(exc), str(exc))
        self._retire_stale_batchers()
        logger.info("loaded %s %s (sha256 %s)", model.name, model.manifest.version, model.provenance.sha256[:12])
        return _model_info(model)

    async def UnloadModel(
        self,
        request: stream_pb2.UnloadModelRequest,
        context: grpc.aio.ServicerContext[stream_pb2.UnloadModelRequest, stream_pb2.UnloadModelResponse],
    ) -> stream_pb2.UnloadModelResponse:
        try:
            self._registry.unload(request.name)
        except ModelNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        self._retire_stale_batchers()
        return stream_pb2.UnloadModelResponse()

    async def Subscribe(
        self,
        request: stream_pb2.SubscribeRequest,
        context: grpc.aio.ServicerContext[stream_pb2.SubscribeRequest, stream_pb2.Result],
    ) -> AsyncIterator[stream_pb2.Result]:
        if self._captures is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server runs no capture (see --capture)")
        try:
            subscription = self._captures.subscribe(request.capture)
        except EdgescopeError as exc:
            await context.abort(status_code_for(exc), str(exc))
        async with subscription:
            async for result in subscription:
                yield result
