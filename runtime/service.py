"""The gRPC servicer: Stream, Infer, ListModels, GetModel.

Handlers never run model code on the event loop: every frame goes to the
worker pool. In a stream, a frame that fails gets an error result and the
stream goes on; a unary call that fails is aborted with the mapped status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import Executor

import grpc

from edgescope.errors import EdgescopeError, ModelNotFoundError
from edgescope.runtime.models import LoadedModel, ModelRegistry
from edgescope.runtime.processing import error_result, process_frame
from edgescope.runtime.status import status_code_for
from edgescope.v1 import stream_pb2, stream_pb2_grpc

logger = logging.getLogger(__name__)


def _model_info(model: LoadedModel) -> stream_pb2.ModelInfo:
    return stream_pb2.ModelInfo(name=model.name, manifest=model.manifest, backend=model.provenance.backend, ready=True)


class StreamService(stream_pb2_grpc.StreamServiceServicer):
    def __init__(self, registry: ModelRegistry, executor: Executor) -> None:
        self._registry = registry
        self._executor = executor

    async def _process(self, frame: stream_pb2.Frame, model_name: str) -> stream_pb2.Result:
        received = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, process_frame, self._registry, frame, model_name, received)

    async def Stream(
        self,
        request_iterator: AsyncIterable[stream_pb2.Frame],
        context: grpc.aio.ServicerContext[stream_pb2.Frame, stream_pb2.Result],
    ) -> AsyncIterator[stream_pb2.Result]:
        # The first frame that names a model binds the stream to it.
        model_name = ""
        async for frame in request_iterator:
            if frame.model:
                model_name = frame.model
            try:
                result = await self._process(frame, model_name)
            except EdgescopeError as exc:
                result = error_result(frame, exc)
            except Exception as exc:
                logger.exception("frame %s/%d failed unexpectedly", frame.stream_id, frame.seq)
                result = error_result(frame, exc)
            yield result

    async def Infer(
        self,
        request: stream_pb2.Frame,
        context: grpc.aio.ServicerContext[stream_pb2.Frame, stream_pb2.Result],
    ) -> stream_pb2.Result:
        try:
            return await self._process(request, request.model)
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
