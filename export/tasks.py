"""What each task adds to an export: postprocessing parameters, extra inputs and outputs.

Graph inputs, in order: the frame, the previous frame (registration), then
each recurrent state tensor. Graph outputs, in order: the task output (boxes
for detection), the class scores (detection), then each next state. A model's
``forward`` takes and returns tensors in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from edgescope.errors import ConfigError
from edgescope.v1 import manifest_pb2

if TYPE_CHECKING:
    import torch

    from edgescope.export.api import ExportRequest

T = TypeVar("T")

_BOX_FORMATS: dict[str, manifest_pb2.BoxFormat.ValueType] = {
    "xyxy": manifest_pb2.BOX_FORMAT_XYXY,
    "xywh": manifest_pb2.BOX_FORMAT_XYWH,
    "cxcywh": manifest_pb2.BOX_FORMAT_CXCYWH,
}
_HEATMAPS: dict[str, manifest_pb2.HeatmapNormalization.ValueType] = {
    "fixed": manifest_pb2.HEATMAP_NORMALIZATION_FIXED,
    "per-frame": manifest_pb2.HEATMAP_NORMALIZATION_PER_FRAME,
}
_UNITS: dict[str, manifest_pb2.DisplacementUnits.ValueType] = {
    "pixels": manifest_pb2.DISPLACEMENT_UNITS_PIXELS,
    "mm": manifest_pb2.DISPLACEMENT_UNITS_MILLIMETERS,
}


@dataclass(frozen=True, slots=True)
class StateSpec:
    """A recurrent state tensor: fed to ``input``, next value read from ``output``."""

    input: str
    output: str
    # One stream's state, without the batch axis.
    shape: tuple[int, ...]
    initial_value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> StateSpec:
        """``INPUT:OUTPUT:D1,D2,...[:INITIAL]``, e.g. ``hidden:hidden_out:8,16,16``."""
        parts = text.split(":")
        try:
            if len(parts) not in (3, 4) or not parts[0] or not parts[1]:
                raise ValueError(text)
            shape = tuple(int(d) for d in parts[2].split(","))
            initial = float(parts[3]) if len(parts) == 4 else 0.0
        except ValueError as exc:
            raise ConfigError(f"state {text!r} must look like INPUT:OUTPUT:D1,D2,...[:INITIAL]") from exc
        return cls(parts[0], parts[1], shape, initial)


def _choice(value: str, options: Mapping[str, T], what: str) -> T:
    if value not in options:
        raise ConfigError(f"{what} {value!r} is not supported; choose one of: {', '.join(options)}")
    return options[value]


def postprocessing(
    request: ExportRequest, task: manifest_pb2.Task.ValueType, activation: manifest_pb2.Activation.ValueType
) -> manifest_pb2.Postprocessing:
    post = manifest_pb2.Postprocessing(output=request.output_name)
    if task == manifest_pb2.TASK_SEGMENTATION:
        post.segmentation.CopyFrom(
            manifest_pb2.SegmentationParams(
                activation=activation, threshold=request.threshold, min_component_pixels=request.min_component_pixels
            )
        )
    elif task == manifest_pb2.TASK_CLASSIFICATION:
        post.classification.activation = activation
    elif task == manifest_pb2.TASK_DETECTION:
        post.detection.CopyFrom(
            manifest_pb2.DetectionParams(
                scores_output=request.scores_output,
                activation=activation,
                box_format=_choice(request.box_format, _BOX_FORMATS, "box format"),
                score_threshold=request.score_threshold,
                iou_threshold=request.iou_threshold,
                max_boxes=request.max_boxes,
            )
        )
    elif task == manifest_pb2.TASK_ANOMALY:
        post.anomaly.CopyFrom(
            manifest_pb2.AnomalyParams(
                score_threshold=request.anomaly_threshold,
                heatmap_normalization=_choice(request.heatmap, _HEATMAPS, "heat-map normalisation"),
                heatmap_max=request.heatmap_max,
            )
        )
    elif task == manifest_pb2.TASK_IMAGE:
        low, high = request.output_range
        if high <= low:
            raise ConfigError(f"output range {low}..{high} is empty")
        post.image.CopyFrom(manifest_pb2.ImageParams(output_min=low, output_max=high))
    elif task == manifest_pb2.TASK_REGISTRATION:
        post.registration.units = _choice(request.displacement_units, _UNITS, "displacement units")
    return post


def batch_dim(request: ExportRequest) -> manifest_pb2.Dim:
    """Every tensor's leading axis: the symbol ``batch``, or one frame when the batch is fixed."""
    return manifest_pb2.Dim(size=1) if request.static_batch else manifest_pb2.Dim(symbol="batch")


def input_names(request: ExportRequest) -> list[str]:
    names = [request.input_name, *(source.name for source in request.source_inputs)]
    if request.previous_frame_input:
        names.append(request.previous_frame_input)
    names.extend(s.input for s in request.state)
    if len(set(names)) != len(names):
        raise ConfigError(f"input names must differ: {', '.join(names)}")
    return names


def output_names(request: ExportRequest) -> list[str]:
    names = [request.output_name]
    if request.task == "detection":
        names.append(request.scores_output)
    names.extend(s.output for s in request.state)
    if len(set(names)) != len(names):
        raise ConfigError(f"output names must differ: {', '.join(names)}")
    return names


def add_inputs(manifest: manifest_pb2.ModelManifest, request: ExportRequest) -> None:
    """Declare the previous-frame and state inputs after the frame input, with their roles."""
    frame = manifest.inputs[0]
    if not request.previous_frame_input and not request.state:
        return
    if not any(b.role == manifest_pb2.INPUT_ROLE_FRAME for b in manifest.input_bindings):
        manifest.input_bindings.add(input=frame.name, role=manifest_pb2.INPUT_ROLE_FRAME)
    if request.previous_frame_input:
        manifest.inputs.add(name=request.previous_frame_input, dtype=frame.dtype, shape=frame.shape)
        manifest.input_bindings.add(input=request.previous_frame_input, role=manifest_pb2.INPUT_ROLE_PREVIOUS_FRAME)
    for spec in request.state:
        if not spec.shape or any(d <= 0 for d in spec.shape):
            raise ConfigError(f"state {spec.input} needs a positive shape, got {spec.shape}")
        manifest.state.add(
            input=spec.input,
            output=spec.output,
            shape=spec.shape,
            dtype=manifest_pb2.DATA_TYPE_FLOAT32,
            initial_value=spec.initial_value,
        )
        shape = [batch_dim(request), *(manifest_pb2.Dim(size=d) for d in spec.shape)]
        manifest.inputs.add(name=spec.input, dtype=manifest_pb2.DATA_TYPE_FLOAT32, shape=shape)
        manifest.input_bindings.add(input=spec.input, role=manifest_pb2.INPUT_ROLE_STATE)


def for_task(model: torch.nn.Module, task: str) -> torch.nn.Module:
    """The module to export: an autoencoder gets its reconstruction error appended."""
    if task != "anomaly":
        return model
    import torch

    class ReconstructionError(torch.nn.Module):
        """Per-pixel squared reconstruction error, averaged over channels: (B, 1, H, W)."""

        def __init__(self, autoencoder: torch.nn.Module) -> None:
            super().__init__()
            self.autoencoder = autoencoder

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            error: torch.Tensor = (self.autoencoder(image) - image).square().mean(dim=1, keepdim=True)
            return error

    return ReconstructionError(model).eval()
