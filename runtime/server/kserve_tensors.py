"""KServe v2 tensors: a request's inputs decoded and checked against the model and the server's limits,
and the model's outputs encoded into a response.

Inputs come as ``raw_input_contents`` (little-endian, row-major) or as typed
``contents``; every size is checked in exact integer arithmetic before
anything is allocated. Outputs go back as ``raw_output_contents``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgescope.errors import FrameError
from edgescope.kserve.datatypes import DATATYPE_OF, NUMPY_DTYPES, tensor_datatype, tensor_shape
from edgescope.kserve.v2 import inference_pb2 as pb
from edgescope.runtime.backends.base import Feed
from edgescope.runtime.server.grpc_status import echo
from edgescope.runtime.server.registry import ServedModel
from edgescope.v1 import manifest_pb2

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

    # Largest first dimension for a model whose batch dimension is dynamic: the server's ``--max-batch``.
    max_batch: int = 8
    # All input tensors of one request together, decoded.
    max_request_bytes: int = 64 * 1024 * 1024


DEFAULT_TENSOR_LIMITS = TensorLimits()


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
        datatype = DATATYPE_OF.get(array.dtype)
        if datatype != expected.datatype:
            raise FrameError(f"input {name!r} must be {expected.datatype}, the request gives {datatype}")
        fits = len(array.shape) == len(expected.shape) and all(
            want in (-1, got) for want, got in zip(expected.shape, array.shape, strict=True)
        )
        if not fits:
            raise FrameError(
                f"input {name!r} must have shape {list(expected.shape)}, the request gives {list(array.shape)}"
            )
        # The server's cap, and the session's own (a TensorRT engine's optimization profile) where lower.
        most = min(limits.max_batch, model.capabilities.max_batch or limits.max_batch)
        if expected.shape and expected.shape[0] == -1 and array.shape[0] > most:
            raise FrameError(
                f"input {name!r}: batch of {array.shape[0]}; model {model.name!r} runs at most {most} per request"
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
        datatype = DATATYPE_OF.get(array.dtype)
        if datatype is None:
            raise FrameError(f"output {name!r} has dtype {array.dtype}, which the protocol cannot carry")
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return response
