"""The Open Inference Protocol (KServe v2 gRPC) for every loaded model.

Served on the same port as edgescope's own API, under the standard service
name ``inference.GRPCInferenceService``, so tritonclient and other standard
tooling call any loaded model at tensor level: no preprocessing, no
postprocessing, the model's own input and output tensors.

Inputs come as ``raw_input_contents`` (little-endian, row-major) or as typed
``contents``; outputs go back as ``raw_output_contents``. Decoding and
encoding run on the frame threads and inference on the model's worker,
never on the event loop. A unary call
that fails is aborted with the mapped gRPC status; in ``ModelStreamInfer`` a
failed request gets a response with ``error_message`` and the stream goes on.

The handlers are registered with a generic handler because the messages'
protobuf package is ``edgescope.kserve.v2`` (see the .proto for why); the
method paths are the standard's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from edgescope import __version__
from edgescope.errors import EdgescopeError, FrameError, ModelNotFoundError
from edgescope.kserve.v2 import inference_pb2 as pb
from edgescope.runtime.backends.base import Feed
from edgescope.runtime.backends.tensors import tensor_datatype, tensor_shape
from edgescope.runtime.server.registry import ModelRegistry, ServedModel
from edgescope.runtime.server.status import echo, status_code_for
from edgescope.runtime.server.streams import StreamRegistry
from edgescope.runtime.server.workers import Job
from edgescope.v1 import manifest_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"

# Open Inference Protocol datatypes with a fixed-size numpy equivalent (BYTES has none).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_DATATYPE_OF = {dtype: name for name, dtype in NUMPY_DTYPES.items()}


# Where each datatype's values sit in InferTensorContents (FP16 has no typed field).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

# Typed contents cost a Python object per value while decoding; larger tensors go as raw bytes.
MAX_TYPED_VALUES = 1 << 20
MAX_INPUTS = 64
MAX_DIMS = 8


@dataclass(frozen=True, slots=True)
class TensorLimits:
    """What one request may make the server allocate and run."""

    # Largest first dimension for a model whose batch dimension is dynamic.
    max_batch: int = 16
    # All input tensors of one request together, decoded.
    max_request_bytes: int = 64 * 1024 * 1024


DEFAULT_TENSOR_LIMITS = TensorLimits()

Request = TypeVar("Request")
Response = TypeVar("Response")


def tensor_metadata(spec: manifest_pb2.TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    """A manifest tensor as the protocol describes it: -1 for each dynamic dimension."""
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=tensor_datatype(spec), shape=tensor_shape(spec)
    )


def tensor_bytes(tensor: pb.ModelInferRequest.InferInputTensor, itemsize: int, budget: int) -> int:
    """Bytes the tensor's shape needs, in exact integer arithmetic, refused once past ``budget``."""
    shape = list(tensor.shape)
    if len(shape) > MAX_DIMS:
        raise FrameError(f"input {echo(tensor.name)}: {len(shape)} dimensions; at most {MAX_DIMS}")
    if any(dim < 0 for dim in shape):
        raise FrameError(f"input {echo(tensor.name)}: shape {shape} has a negative dimension")
    size = itemsize
    for dim in shape:
        size *= dim
        if size > budget:
            raise FrameError(
                f"input {echo(tensor.name)}: shape {shape} needs more than the {budget} bytes left "
                "in this request's budget"
            )
    return size


def _input_array(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, budget: int
) -> npt.NDArray[np.generic]:
    dtype = NUMPY_DTYPES.get(tensor.datatype)
    if dtype is None:
        supported = ", ".join(NUMPY_DTYPES)
        raise FrameError(
            f"input {echo(tensor.name)}: datatype {echo(tensor.datatype)} is not supported; use one of {supported}"
        )
    size = tensor_bytes(tensor, dtype.itemsize, budget)
    count = size // dtype.itemsize
    if raw is not None:
        if len(raw) != size:
            raise FrameError(
                f"input {echo(tensor.name)}: raw contents are {len(raw)} bytes; "
                f"{tensor.datatype} {list(tensor.shape)} needs {size}"
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(tensor.shape)
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise FrameError(f"input {echo(tensor.name)}: {tensor.datatype} can only be sent as raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise FrameError(
            f"input {echo(tensor.name)}: {len(values)} values in contents.{field}; "
            f"shape {list(tensor.shape)} needs {count}"
        )
    if count > MAX_TYPED_VALUES:
        raise FrameError(
            f"input {echo(tensor.name)}: {count} typed values; send more than {MAX_TYPED_VALUES} as raw_input_contents"
        )
    try:
        return np.asarray(values, dtype=dtype).reshape(tensor.shape)
    except (OverflowError, ValueError) as exc:  # e.g. 300 in contents for a UINT8 input
        raise FrameError(f"input {echo(tensor.name)}: values do not fit {tensor.datatype}: {exc}") from exc


def decode_inputs(
    request: pb.ModelInferRequest, limits: TensorLimits = DEFAULT_TENSOR_LIMITS
) -> dict[str, npt.NDArray[np.generic]]:
    """The request's input tensors by name, from raw or typed contents, within the request's byte budget."""
    if not request.inputs:
        raise FrameError("the request has no inputs")
    if len(request.inputs) > MAX_INPUTS:
        raise FrameError(f"the request has {len(request.inputs)} inputs; at most {MAX_INPUTS}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise FrameError(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "when raw contents are used, every input needs one"
        )
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    budget = limits.max_request_bytes
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise FrameError(f"input {echo(tensor.name)} is given twice")
        array = _input_array(tensor, raw[index] if raw else None, budget)
        budget -= array.nbytes
        arrays[tensor.name] = array
    return arrays


def check_feed(model: ServedModel, feed: Feed, limits: TensorLimits = DEFAULT_TENSOR_LIMITS) -> None:
    """Refuse inputs that do not match the manifest, or a batch over the cap, before the backend sees them."""
    specs = {spec.name: spec for spec in model.manifest.inputs}
    if set(feed) != set(specs):
        given = sorted(echo(name) for name in feed)[:8]
        raise FrameError(f"model {model.name!r} takes inputs {sorted(specs)}, the request gives {given}")
    for name, array in feed.items():
        expected = tensor_metadata(specs[name])
        datatype = _DATATYPE_OF.get(array.dtype)
        if datatype != expected.datatype:
            raise FrameError(f"input {name!r} must be {expected.datatype}, the request gives {datatype}")
        fits = len(array.shape) == len(expected.shape) and all(
            want in (-1, got) for want, got in zip(expected.shape, array.shape, strict=True)
        )
        if not fits:
            raise FrameError(
                f"input {name!r} must have shape {list(expected.shape)}, the request gives {list(array.shape)}"
            )
        if expected.shape and expected.shape[0] == -1 and array.shape[0] > limits.max_batch:
            raise FrameError(
                f"input {name!r}: batch of {array.shape[0]}; this server runs at most {limits.max_batch} per request"
            )


def infer_response(
    model: ServedModel, request: pb.ModelInferRequest, outputs: dict[str, npt.NDArray[np.generic]]
) -> pb.ModelInferResponse:
    requested = [output.name for output in request.outputs] or list(outputs)
    unknown = [echo(name) for name in requested if name not in outputs]
    if unknown:
        raise FrameError(f"model {model.name!r} has no output(s) {unknown[:8]}; it has {sorted(outputs)}")
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.manifest.version, id=request.id)
    for name in requested:
        array = np.asarray(outputs[name])
        datatype = _DATATYPE_OF.get(array.dtype)
        if datatype is None:
            raise FrameError(f"output {name!r} has dtype {array.dtype}, which the protocol cannot carry")
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return response


def _version_matches(model: ServedModel, version: str) -> bool:
    return not version or version == model.manifest.version


class KServeService:
    """The protocol's handlers over a model registry; tensors in, tensors out."""

    def __init__(
        self,
        registry: ModelRegistry,
        executor: Executor,
        streams: StreamRegistry,
        limits: TensorLimits = DEFAULT_TENSOR_LIMITS,
    ) -> None:
        self._registry = registry
        self._executor = executor
        self._streams = streams
        self._limits = limits

    def _checked_feed(self, model: ServedModel, request: pb.ModelInferRequest) -> dict[str, npt.NDArray[np.generic]]:
        feed = decode_inputs(request, self._limits)
        check_feed(model, feed, self._limits)
        return feed

    async def _run(self, request: pb.ModelInferRequest, lane: str) -> pb.ModelInferResponse:
        """One request: decode on a frame thread, infer on the model's worker, encode on a frame thread."""
        if not request.model_name:
            raise ModelNotFoundError("the request names no model (model_name is empty)")
        loop = asyncio.get_running_loop()
        model = self._registry.lease(request.model_name)
        try:
            if not _version_matches(model, request.model_version):
                raise ModelNotFoundError(
                    f"model {model.name!r} has version {model.manifest.version!r}, not {echo(request.model_version)}"
                )
            feed = await loop.run_in_executor(self._executor, self._checked_feed, model, request)
            inferred = await model.infer(Job(lane=lane, feed=feed))
            return await loop.run_in_executor(self._executor, infer_response, model, request, inferred.outputs)
        finally:
            self._registry.release(model)

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
            model = self._registry.get(request.name) if request.name else None
        except ModelNotFoundError:
            model = None
        return pb.ModelReadyResponse(ready=model is not None and _version_matches(model, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="edgescope", version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        if not request.name:
            await _abort(context, FrameError("ModelMetadata needs a model name"))
        try:
            model = self._registry.get(request.name)
        except ModelNotFoundError as exc:
            await _abort(context, exc)
        if not _version_matches(model, request.version):
            await _abort(context, ModelNotFoundError(f"model {model.name!r} has no version {echo(request.version)}"))
        manifest = model.manifest
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[manifest.version],
            platform=model.provenance.backend,
            inputs=[tensor_metadata(spec) for spec in manifest.inputs],
            outputs=[tensor_metadata(spec) for spec in manifest.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        try:
            return await self._run(request, self._streams.next_lane("kserve"))
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


def _echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    # Stream clients match an error to its request by id.
    return pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: EdgescopeError) -> NoReturn:
    await context.abort(status_code_for(error), str(error))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _unary(
    behavior: Callable[[Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]],
    request_type: type[Request],
) -> grpc.RpcMethodHandler[Request, Response]:
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=request_type.FromString,  # type: ignore[attr-defined]
        response_serializer=lambda message: message.SerializeToString(),
    )


def add_kserve_service(
    registry: ModelRegistry,
    executor: Executor,
    streams: StreamRegistry,
    server: grpc.aio.Server,
    limits: TensorLimits = DEFAULT_TENSOR_LIMITS,
) -> None:
    """Serve the Open Inference Protocol for ``registry``'s models on ``server``."""
    service = KServeService(registry, executor, streams, limits)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "ServerLive": _unary(service.ServerLive, pb.ServerLiveRequest),
        "ServerReady": _unary(service.ServerReady, pb.ServerReadyRequest),
        "ModelReady": _unary(service.ModelReady, pb.ModelReadyRequest),
        "ServerMetadata": _unary(service.ServerMetadata, pb.ServerMetadataRequest),
        "ModelMetadata": _unary(service.ModelMetadata, pb.ModelMetadataRequest),
        "ModelInfer": _unary(service.ModelInfer, pb.ModelInferRequest),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            service.ModelStreamInfer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
