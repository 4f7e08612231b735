"""A manifest's tensors as the Open Inference Protocol names them (datatype strings, -1 for dynamic axes)."""

from __future__ import annotations

from edgescope.v1 import manifest_pb2

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
    return MANIFEST_DATATYPES.get(spec.dtype, "FP32")


def tensor_shape(spec: manifest_pb2.TensorSpec) -> list[int]:
    return [dim.size if dim.WhichOneof("kind") == "size" else -1 for dim in spec.shape]
