"""The gRPC servicer: Stream, Infer, ListModels, GetModel, LoadModel, UnloadModel, Subscribe.

Handlers never run model code on the event loop and never touch a session:
frames go through ``StreamRun`` (or ``infer_one``) to the model's worker. A
frame that fails gets an error result and the stream goes on; a stream that
cannot be read, or is cut short by shutdown, ends with a status that says
so after every frame read has its answer. A unary call that fails is
aborted with the mapped status.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import Executor

import grpc

from edgescope.errors import EdgescopeError, ModelNotFoundError
from edgescope.runtime.server.admission import Admission
from edgescope.runtime.server.auth import current_client
from edgescope.runtime.server.capture import CaptureHub
from edgescope.runtime.server.frame_run import infer_one, unary_lane
from edgescope.runtime.server.grpc_status import status_code_for
from edgescope.runtime.server.memory import MemoryReturn
from edgescope.runtime.server.registry import ModelRegistry, ServedModel
from edgescope.runtime.server.repository import ModelRepository
from edgescope.runtime.server.shm import REGIONS, SharedMemoryServicer
from edgescope.runtime.server.streams import SchedulerConfig, StreamRegistry, StreamRun
from edgescope.runtime.telemetry.metrics import RuntimeMetrics
from edgescope.v1 import stream_pb2, stream_pb2_grpc

logger = logging.getLogger(__name__)


def _model_info(model: ServedModel) -> stream_pb2.ModelInfo:
    provenance = model.provenance
    return stream_pb2.ModelInfo(
        name=model.name,
        manifest=model.manifest,
        backend=provenance.backend,
        ready=True,
        provenance=provenance,
        instances=model.worker.instances,
        self_test=model.self_test,
    )


class StreamService(SharedMemoryServicer, stream_pb2_grpc.StreamServiceServicer):
    def __init__(
        self,
        models: ModelRegistry,
        loader: Executor,
        config: SchedulerConfig,
        metrics: RuntimeMetrics,
        repository: ModelRepository | None = None,
    ) -> None:
        self._models = models
        # Where LoadModel finds bundles; no root: LoadModel is refused.
        self._repository = repository or ModelRepository(None)
        self._metrics = metrics
        self._loader = loader
        self._config = config
        self._captures: CaptureHub | None = None
        self.streams = StreamRegistry()
        # Unary calls per client at once (Infer here, ModelInfer in KServe): the rest wait their turn.
        self.admission = Admission()
        self.memory = MemoryReturn()

    def attach_captures(self, captures: CaptureHub | None) -> None:
        self._captures = captures

    def _new_run(self, kind: str) -> StreamRun:
        return StreamRun(
            self._models,
            self._config,
            self._metrics,
            self.streams.next_lane(kind),
            REGIONS.view,
            parallel=self._models.options.instances,
        )

    async def run_capture(self, frames: AsyncIterable[stream_pb2.Frame]) -> AsyncIterator[stream_pb2.Result]:
        """A capture's frames, scheduled and answered like any stream's."""
        run = self._new_run("capture")
        self.streams.add(run)
        try:
            async for result in run.results(frames):
                yield result
        finally:
            self.streams.remove(run)

    async def Stream(
        self,
        request_iterator: AsyncIterable[stream_pb2.Frame],
        context: grpc.aio.ServicerContext[stream_pb2.Frame, stream_pb2.Result],
    ) -> AsyncIterator[stream_pb2.Result]:
        # Refused by ending with a status, not by an abort: an abort before the first answer reads as INTERNAL.
        if self.streams.draining:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("the server is shutting down; use another server")
            return
        client = current_client()
        refusal = self.admission.open_stream(client)
        if refusal is not None:
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(refusal)
            return
        run = self._new_run("stream")
        self.streams.add(run)
        try:
            async for result in run.results(request_iterator):
                yield result
        finally:
            self.streams.remove(run)
            self.admission.close_stream(client)
            # A client that crashed never unregisters its ring; unmap it with its stream.
            for stream_id in run.stream_ids:
                REGIONS.release_stream(stream_id)
            self.memory.stream_ended()
        outcome = run.outcome()
        if outcome.code != grpc.StatusCode.OK:
            context.set_code(outcome.code)
            context.set_details(outcome.details)

    async def Infer(
        self,
        request: stream_pb2.Frame,
        context: grpc.aio.ServicerContext[stream_pb2.Frame, stream_pb2.Result],
    ) -> stream_pb2.Result:
        received_ns, received_wall_ns = time.perf_counter_ns(), time.time_ns()
        try:
            async with self.admission.turn(current_client()):
                result = await infer_one(self._models, request, unary_lane(), REGIONS.view)
        except EdgescopeError as exc:
            await context.abort(status_code_for(exc), str(exc))
        except Exception as exc:
            logger.exception("Infer failed unexpectedly")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        residence_ns = time.perf_counter_ns() - received_ns
        result.alerts.extend(self._metrics.alerts_for(result.provenance.model, residence_ns))
        result.server_receive_time_ns = received_wall_ns
        result.server_send_time_ns = time.time_ns()
        self._metrics.observe_result(result.provenance.model, request.stream_id, result, residence_ns)
        return result

    async def ListModels(
        self,
        request: stream_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[stream_pb2.ListModelsRequest, stream_pb2.ListModelsResponse],
    ) -> stream_pb2.ListModelsResponse:
        served = [_model_info(m) for m in self._models.all()]
        refused = [
            stream_pb2.ModelInfo(name=name, ready=False, not_ready_reason=reason)
            for name, reason in sorted(self._models.failed().items())
        ]
        return stream_pb2.ListModelsResponse(models=served + refused)

    async def GetModel(
        self,
        request: stream_pb2.GetModelRequest,
        context: grpc.aio.ServicerContext[stream_pb2.GetModelRequest, stream_pb2.ModelInfo],
    ) -> stream_pb2.ModelInfo:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "GetModel needs a model name")
        try:
            return _model_info(self._models.get(request.name))
        except ModelNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def LoadModel(
        self,
        request: stream_pb2.LoadModelRequest,
        context: grpc.aio.ServicerContext[stream_pb2.LoadModelRequest, stream_pb2.ModelInfo],
    ) -> stream_pb2.ModelInfo:
        if not request.bundle:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "LoadModel needs a bundle name")

        # Loading, warm-up and checks happen before the swap, on the loader thread: streams keep running.
        load = functools.partial(
            self._models.load_named, self._repository, request.bundle, request.name or None, current_client()
        )
        try:
            model = await asyncio.get_running_loop().run_in_executor(self._loader, load)
        except EdgescopeError as exc:
            await context.abort(status_code_for(exc), str(exc))
        logger.info("loaded %s %s (sha256 %s)", model.name, model.manifest.version, model.provenance.sha256[:12])
        return _model_info(model)

    async def UnloadModel(
        self,
        request: stream_pb2.UnloadModelRequest,
        context: grpc.aio.ServicerContext[stream_pb2.UnloadModelRequest, stream_pb2.UnloadModelResponse],
    ) -> stream_pb2.UnloadModelResponse:
        try:
            self._models.unload(request.name, current_client())
        except ModelNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
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
            try:
                async for result in subscription:
                    yield result
            except EdgescopeError as exc:
                # The capture went down: the subscriber hears why, as UNAVAILABLE.
                await context.abort(status_code_for(exc), str(exc))
