"""Open Inference Protocol datatypes: their numpy equivalents and the manifest's names for them.

Shared by the server (decoding requests) and the clients that build them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgescope.v1 import manifest_pb2

# Datatypes with a fixed-size numpy equivalent (BYTES has none).
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
DATATYPE_OF = {dtype: name for name, dtype in NUMPY_DTYPES.items()}

MANIFEST_DATATYPES = {
    manifest_pb2.DATA_TYPE_FLOAT32: "FP32",
    manifest_pb2.DATA_TYPE_FLOAT16: "FP16",
    manifest_pb2.DATA_TYPE_INT8: "INT8",
    manifest_pb2.DATA_TYPE_UINT8: "UINT8",
    manifest_pb2.DATA_TYPE_UINT16: "UINT16",
    manifest_pb2.DATA_TYPE_INT32: "INT32",
    manifest_pb2.DATA_TYPE_INT64: "INT64",
    manifest_pb2.DATA_TYPE_BOOL: "BOOL",
}


def tensor_datatype(spec: manifest_pb2.TensorSpec) -> str:
    """A manifest tensor's datatype as the protocol names it."""
    return MANIFEST_DATATYPES.get(spec.dtype, "FP32")


def tensor_shape(spec: manifest_pb2.TensorSpec) -> list[int]:
    """A manifest tensor's shape as the protocol gives it: -1 for each dynamic dimension."""
    return [dim.size if dim.WhichOneof("kind") == "size" else -1 for dim in spec.shape]


def batches(manifest: manifest_pb2.ModelManifest) -> bool:
    """Whether the model has Triton's implicit batch axis: every tensor leads with a dynamic dimension."""
    tensors = [*manifest.inputs, *manifest.outputs]
    return bool(tensors) and all(t.shape and t.shape[0].WhichOneof("kind") == "symbol" for t in tensors)
