"""Triton's model configuration (``inference.ModelConfig``) of a loaded model.

What Triton's tools read before they drive a model: its tensors (without the
batch dimension when the model batches), the largest batch, the platform and
where its instances run. Built from the bundle's manifest and the server's
own batching settings, so it describes what this server does, not what a
Triton server would.
"""

from __future__ import annotations

from edgescope.kserve.datatypes import MANIFEST_DATATYPES, batches
from edgescope.kserve.v2 import model_config_pb2 as mc
from edgescope.runtime.server.registry import ServedModel
from edgescope.v1 import manifest_pb2

# Backend name -> Triton platform of the same model file.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
_FILES = {"onnxruntime": "model.onnx"}


def _dims(spec: manifest_pb2.TensorSpec, batched: bool) -> list[int]:
    dims = spec.shape[1:] if batched else spec.shape
    return [dim.size if dim.WhichOneof("kind") == "size" else -1 for dim in dims]


def _data_type(spec: manifest_pb2.TensorSpec) -> mc.DataType.ValueType:
    return mc.DataType.Value("TYPE_" + MANIFEST_DATATYPES.get(spec.dtype, "FP32"))


def _instance_group(device: str) -> mc.ModelInstanceGroup:
    # The session's device: "cpu", "cuda:N", an ONNX Runtime GPU provider, or "remote:URL".
    if device == "cpu":
        return mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    if device.startswith("cuda:"):
        return mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=[int(device[5:] or 0)])
    if device in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    # Placed by something else (another server): Triton's KIND_MODEL.
    return mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_MODEL, count=1)


def model_config(model: ServedModel, *, max_batch: int, batch_delay_us: int) -> mc.ModelConfig:
    """``model`` as Triton's ModelConfig, with the server's cross-request batching limits.

    A model whose tensors all lead with a dynamic dimension takes batches
    (``max_batch_size`` is the server's ``--max-batch``); requests are combined
    (``dynamic_batching``) only where the server does so: stateless models of
    one float input, ``--max-batch`` above 1.
    """
    manifest = model.manifest
    batched = batches(manifest)
    backend = model.provenance.backend
    if model.capabilities.max_batch is not None:
        max_batch = min(max_batch, model.capabilities.max_batch)
    config = mc.ModelConfig(
        name=model.name,
        platform=PLATFORMS.get(backend, ""),
        backend=backend,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        max_batch_size=max(max_batch, 1) if batched else 0,
        default_model_filename=_FILES.get(backend, ""),
        instance_group=[_instance_group(model.provenance.device)],
    )
    layout = (
        mc.ModelInput.FORMAT_NHWC
        if manifest.preprocessing.layout == manifest_pb2.LAYOUT_NHWC
        else mc.ModelInput.FORMAT_NCHW
    )
    for index, spec in enumerate(manifest.inputs):
        # The first input is the frame; the others (state, previous frame) are plain tensors.
        config.input.add(
            name=spec.name,
            data_type=_data_type(spec),
            format=layout if index == 0 else mc.ModelInput.FORMAT_NONE,
            dims=_dims(spec, batched),
        )
    for spec in manifest.outputs:
        config.output.add(name=spec.name, data_type=_data_type(spec), dims=_dims(spec, batched))
    if batched and max_batch > 1 and model.batches_requests:
        config.dynamic_batching.max_queue_delay_microseconds = batch_delay_us
    provenance = {
        "task": manifest_pb2.Task.Name(manifest.task).removeprefix("TASK_").lower(),
        "precision": manifest_pb2.Precision.Name(model.provenance.precision).removeprefix("PRECISION_").lower(),
        "sha256": model.provenance.sha256,
        "device": model.provenance.device,
        "validation": "passed" if manifest.validation.passed else "failed",
    }
    for key, value in provenance.items():
        config.parameters[key].string_value = value
    return config
