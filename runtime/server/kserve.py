"""The Open Inference Protocol (KServe v2 gRPC) for every loaded model.

Served on the same port as edgescope's own API as the standard's
``inference.GRPCInferenceService``, so tritonclient, grpcurl and other
standard tooling call any loaded model at tensor level: no preprocessing,
no postprocessing, the model's own input and output tensors. Besides the
KServe v2 core (health, metadata, ``ModelInfer``, ``ModelStreamInfer``) it
answers Triton's ``ModelConfig``, ``ModelStatistics``, ``RepositoryIndex``
and the administrative ``RepositoryModelLoad``/``RepositoryModelUnload``.

Tensors are decoded and encoded (``kserve_tensors``) on the frame threads and
inference runs on the model's worker (which records the statistics), never on
the event loop. A unary call that fails is aborted with the mapped gRPC status;
in ``ModelStreamInfer`` a failed request gets a response with ``error_message``
and the stream goes on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import numpy as np
import numpy.typing as npt

from edgescope import __version__
from edgescope.errors import EdgescopeError, FrameError, ModelNotFoundError
from edgescope.kserve.datatypes import batches
from edgescope.kserve.v2 import inference_pb2 as pb
from edgescope.kserve.v2 import inference_pb2_grpc
from edgescope.runtime.backends.base import Feed
from edgescope.runtime.server.admission import Admission
from edgescope.runtime.server.auth import current_client
from edgescope.runtime.server.frame_run import unary_lane
from edgescope.runtime.server.grpc_status import echo, status_code_for
from edgescope.runtime.server.kserve_tensors import (
    DEFAULT_TENSOR_LIMITS,
    TensorLimits,
    check_feed,
    decode_inputs,
    infer_response,
    tensor_metadata,
)
from edgescope.runtime.server.model_config import model_config
from edgescope.runtime.server.registry import ModelRegistry, ServedModel
from edgescope.runtime.server.repository import ModelRepository
from edgescope.runtime.server.statistics import Duration, StatisticsSnapshot
from edgescope.runtime.server.streams import StreamRegistry
from edgescope.runtime.server.workers import Job, JobResult

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name
# The protocol extensions this server implements (ServerMetadata lists them).
EXTENSIONS = ("model_configuration", "model_repository", "statistics")


def kserve_job(model: ServedModel, request: pb.ModelInferRequest, feed: Feed, lane: str) -> Job[pb.ModelInferResponse]:
    """A request's job; its response is built on the instance thread from the outputs it just made.

    A request to a model of one float input with a dynamic batch axis goes as that input's
    rows, so the worker batches it with other requests and frames as Triton's dynamic
    batcher would; other requests run alone.
    """
    rows = _batch_size(model, feed)

    def finish(inferred: JobResult) -> pb.ModelInferResponse:
        return infer_response(model, request, inferred.outputs)

    (name, tensor), *others = feed.items()
    if not others and model.batches_requests:
        rows_of = np.asarray(tensor, dtype=np.float32)
        return Job(lane=lane, finish=finish, tensor=rows_of, frame_input=name, batchable=True, inferences=rows)
    return Job(lane=lane, finish=finish, feed=feed, inferences=rows)


@dataclass(frozen=True, slots=True)
class KServeSettings:
    """What the protocol reports about the server's batching, and where load/unload take models from."""

    max_batch: int = 8
    batch_delay_us: int = 0
    repository: ModelRepository = field(default_factory=lambda: ModelRepository(None))


def _check_version(model: ServedModel, version: str) -> None:
    if not _version_matches(model, version):
        raise ModelNotFoundError(f"model {model.name!r} has version {model.manifest.version!r}, not {echo(version)}")


def _version_matches(model: ServedModel, version: str) -> bool:
    return not version or version == model.manifest.version


def _batch_size(model: ServedModel, feed: Feed) -> int:
    # Triton counts inferences: a request of batch N makes N.
    if not batches(model.manifest):
        return 1
    return int(feed[model.manifest.inputs[0].name].shape[0]) or 1


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def statistics_message(figures: StatisticsSnapshot) -> pb.ModelStatistics:
    message = pb.ModelStatistics(
        name=figures.name,
        version=figures.version,
        last_inference=figures.last_inference_ms,
        inference_count=figures.inference_count,
        execution_count=figures.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(figures.success),
            fail=_duration(figures.fail),
            queue=_duration(figures.queue),
            compute_input=_duration(figures.compute_input),
            compute_infer=_duration(figures.compute_infer),
            compute_output=_duration(figures.compute_output),
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
    )
    for size, batch in sorted(figures.batches.items()):
        message.batch_stats.add(
            batch_size=size,
            compute_input=_duration(batch.compute_input),
            compute_infer=_duration(batch.compute_infer),
            compute_output=_duration(batch.compute_output),
        )
    return message


class KServeService(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """The protocol's handlers over a model registry; tensors in, tensors out."""

    def __init__(
        self,
        registry: ModelRegistry,
        executor: Executor,
        loader: Executor,
        streams: StreamRegistry,
        settings: KServeSettings = KServeSettings(),
        limits: TensorLimits = DEFAULT_TENSOR_LIMITS,
        admission: Admission | None = None,
    ) -> None:
        self._registry = registry
        self._executor = executor
        self._loader = loader
        self._streams = streams
        self._settings = settings
        self._limits = limits
        # Shared with Infer: a client's unary calls are limited together, whatever the protocol.
        self._admission = admission or Admission()

    def _checked_feed(self, model: ServedModel, request: pb.ModelInferRequest) -> dict[str, npt.NDArray[np.generic]]:
        feed = decode_inputs(request, self._limits)
        check_feed(model, feed, self._limits)
        return feed

    async def _run(self, request: pb.ModelInferRequest, lane: str) -> pb.ModelInferResponse:
        """One request: decode on a frame thread, then infer and encode on the model's instance thread."""
        if not request.model_name:
            raise ModelNotFoundError("the request names no model (model_name is empty)")
        loop = asyncio.get_running_loop()
        model = self._registry.lease(request.model_name)
        try:
            _check_version(model, request.model_version)
            started_ns = time.perf_counter_ns()
            try:
                feed = await loop.run_in_executor(self._executor, self._checked_feed, model, request)
            except EdgescopeError:
                # Refused before it reached the model: a failed request all the same, as Triton counts it.
                elapsed_ns = time.perf_counter_ns() - started_ns
                model.statistics.record(success=False, queue_ns=0, compute_input_ns=elapsed_ns, infer_ns=0, output_ns=0)
                raise
            return await model.infer(kserve_job(model, request, feed, lane))
        finally:
            self._registry.release(model)

    def _model(self, name: str, version: str, call: str) -> ServedModel:
        if not name:
            raise FrameError(f"{call} needs a model name")
        model = self._registry.get(name)
        _check_version(model, version)
        return model

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        # Models are loaded and warmed up before the server starts serving.
        return pb.ServerReadyResponse(ready=bool(self._registry.all()))

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version, "ModelReady")
        except EdgescopeError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="edgescope", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        try:
            model = self._model(request.name, request.version, "ModelMetadata")
        except EdgescopeError as exc:
            await _abort(context, exc)
        manifest = model.manifest
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[manifest.version],
            platform=model.provenance.backend,
            inputs=[tensor_metadata(spec) for spec in manifest.inputs],
            outputs=[tensor_metadata(spec) for spec in manifest.outputs],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelConfigResponse:
        try:
            model = self._model(request.name, request.version, "ModelConfig")
        except EdgescopeError as exc:
            await _abort(context, exc)
        config = model_config(model, max_batch=self._settings.max_batch, batch_delay_us=self._settings.batch_delay_us)
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelStatisticsResponse:
        # No name: every loaded model, as Triton answers.
        try:
            models = (
                [self._model(request.name, request.version, "ModelStatistics")]
                if request.name
                else sorted(self._registry.all(), key=lambda m: m.name)
            )
        except EdgescopeError as exc:
            await _abort(context, exc)
        return pb.ModelStatisticsResponse(model_stats=[statistics_message(m.statistics.snapshot()) for m in models])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            await _abort(context, FrameError(_ONE_REPOSITORY))
        loaded = {model.name: model for model in self._registry.all()}
        available = self._settings.repository.names()
        response = pb.RepositoryIndexResponse()
        for name in sorted({*loaded, *available}):
            model = loaded.get(name)
            if model is not None:
                response.models.add(name=name, version=model.manifest.version, state="READY")
            elif not request.ready:
                response.models.add(name=name, state="UNAVAILABLE", reason="unloaded")
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryModelLoadResponse:
        try:
            _check_repository_request(request.repository_name, request.model_name, request.parameters)
            # Loading reads, hashes, warms up and checks a bundle: seconds, on the loader thread.
            load = functools.partial(
                self._registry.load_named,
                self._settings.repository,
                request.model_name,
                request.model_name,
                current_client(),
            )
            model = await asyncio.get_running_loop().run_in_executor(self._loader, load)
        except EdgescopeError as exc:
            await _abort(context, exc)
        logger.info("loaded %s %s from the model repository", model.name, model.manifest.version)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            _check_repository_request(
                request.repository_name, request.model_name, request.parameters, _UNLOAD_PARAMETERS
            )
            # Requests in flight finish on the model; it closes after the last one.
            self._registry.unload(request.model_name, current_client())
        except EdgescopeError as exc:
            await _abort(context, exc)
        logger.info("unloaded %s", request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        try:
            async with self._admission.turn(current_client()):
                return await self._run(request, unary_lane())
        except EdgescopeError as exc:
            await _abort(context, exc)
        except Exception as exc:
            logger.exception("ModelInfer failed unexpectedly")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # One response per request, in order; a failed request does not end the stream.
        lane = self._streams.next_lane("kserve-stream")
        async for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._run(request, lane))
            except EdgescopeError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc), infer_response=_echo(request))
            except Exception as exc:
                logger.exception("ModelStreamInfer request failed unexpectedly")
                yield pb.ModelStreamInferResponse(
                    error_message=f"internal error: {type(exc).__name__}", infer_response=_echo(request)
                )


_ONE_REPOSITORY = "this server has one model repository; leave repository_name empty"


def _check_repository_request(
    repository_name: str, model_name: str, parameters: Any, accepted: frozenset[str] = frozenset()
) -> None:
    if repository_name:
        raise FrameError(_ONE_REPOSITORY)
    if not model_name:
        raise FrameError("model_name is empty: name a model of the repository")
    refused = sorted(set(parameters) - accepted)
    if refused:
        # Triton lets a load override the config or files; a bundle is what its manifest and hashes say.
        raise FrameError(f"parameters {refused} are not supported: the bundle in the repository defines the model")


# Nothing depends on an edgescope model (there are no ensembles), so unloading
# "dependents" (tritonclient always sends the flag) unloads nothing more.
_UNLOAD_PARAMETERS = frozenset({"unload_dependents"})


def _echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    # Stream clients match an error to its request by id.
    return pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: EdgescopeError) -> NoReturn:
    await context.abort(status_code_for(error), str(error))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def add_kserve_service(
    registry: ModelRegistry,
    executors: tuple[Executor, Executor],
    streams: StreamRegistry,
    server: grpc.aio.Server,
    settings: KServeSettings = KServeSettings(),
    limits: TensorLimits = DEFAULT_TENSOR_LIMITS,
    admission: Admission | None = None,
) -> KServeService:
    """Serve the Open Inference Protocol for ``registry``'s models on ``server`` (frame threads, loader thread)."""
    frames, loader = executors
    service = KServeService(registry, frames, loader, streams, settings, limits, admission)
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    return service
