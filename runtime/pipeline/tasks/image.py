"""Image-to-image (denoising, enhancement, super-resolution): output -> 8-bit image of the frame."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from edgescope.errors import BackendError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.runtime.pipeline.tasks.common import FloatArray, TaskResult, frame_region, resize_to, task_output
from edgescope.v1 import manifest_pb2, stream_pb2


def output_range(params: manifest_pb2.ImageParams) -> tuple[float, float]:
    low, high = params.output_min, params.output_max
    return (low, high) if high > low else (0.0, 1.0)


def to_uint8(output: FloatArray, params: manifest_pb2.ImageParams) -> npt.NDArray[np.uint8]:
    """``(1, C, H, W)`` in the model's output range -> ``(H, W)`` or ``(H, W, 3)`` 8-bit."""
    if output.ndim != 4 or output.shape[0] != 1 or output.shape[1] not in (1, 3):
        raise BackendError(f"image output has shape {output.shape}; expected (1, 1 or 3, H, W)")
    low, high = output_range(params)
    scaled = np.clip((output[0] - low) / (high - low), 0.0, 1.0) * 255.0
    image = np.rint(scaled).astype(np.uint8).transpose(1, 2, 0)
    return image[:, :, 0] if image.shape[2] == 1 else np.ascontiguousarray(image)


def postprocess_image(
    outputs: Outputs,
    manifest: manifest_pb2.ModelManifest,
    geometry: Geometry,
    regions: Sequence[stream_pb2.CalibratedRegion],
) -> TaskResult:
    output = task_output(outputs, manifest)
    image = to_uint8(output, manifest.postprocessing.image)
    # A super-resolution model keeps its gain: the frame's size times output/input.
    factor = output.shape[2] / manifest.preprocessing.height
    region = frame_region(image, geometry, manifest.preprocessing.height)
    height, width = round(geometry.frame_height * factor), round(geometry.frame_width * factor)
    return TaskResult(images={"image": resize_to(region, height, width)})
