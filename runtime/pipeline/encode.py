"""Task results -> Result message fields (mask as PNG or run lengths)."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import BackendError
from edgescope.runtime.pipeline.postprocess import TaskResult
from edgescope.v1 import manifest_pb2, stream_pb2

# Masks are mostly runs of one value: rows unfiltered at zlib's fastest level encode in half the time of
# OpenCV's defaults and decode five times faster at the client (480x640: 0.46 + 0.2 ms vs 0.99 + 1.5 ms),
# for a PNG of about 2 KB instead of 1.7.
_FAST_PNG = (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE, cv2.IMWRITE_PNG_COMPRESSION, 1)


def rle_encode(mask: npt.NDArray[np.uint8]) -> list[int]:
    """Run lengths of the flattened binary mask, starting with a run of zeros."""
    flat = (mask.reshape(-1) > 0).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat.size and flat[0] == 1 else runs


def rle_decode(counts: list[int], height: int, width: int) -> npt.NDArray[np.uint8]:
    values = np.arange(len(counts), dtype=np.int64) % 2
    flat = np.repeat(values.astype(np.uint8), counts)
    if flat.size != height * width:
        raise ValueError(f"run lengths cover {flat.size} pixels, mask has {height * width}")
    return flat.reshape(height, width)


def encode_mask(mask: npt.NDArray[np.uint8], labels: list[str], encoding: int) -> stream_pb2.Mask:
    message = stream_pb2.Mask()
    _fill_mask(message, mask, labels, encoding)
    return message


def _fill_mask(message: stream_pb2.Mask, mask: npt.NDArray[np.uint8], labels: list[str], encoding: int) -> None:
    message.width, message.height = mask.shape[1], mask.shape[0]
    message.labels.extend(labels)
    if encoding == stream_pb2.MASK_ENCODING_RLE:
        if int(mask.max(initial=0)) > 1:
            raise BackendError("run-length masks carry one label; ask for PNG for multi-class masks")
        message.encoding = stream_pb2.MASK_ENCODING_RLE
        message.rle_counts.extend(rle_encode(mask))
        return
    ok, png = cv2.imencode(".png", mask, _FAST_PNG)
    if not ok:
        raise BackendError("PNG encoding of the mask failed")
    message.encoding = stream_pb2.MASK_ENCODING_PNG
    message.png = png.tobytes()


def decode_mask(mask: stream_pb2.Mask) -> npt.NDArray[np.uint8]:
    """Label mask from a Mask message (used by clients)."""
    if mask.encoding == stream_pb2.MASK_ENCODING_RLE:
        return rle_decode(list(mask.rle_counts), mask.height, mask.width)
    image = cv2.imdecode(np.frombuffer(mask.png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("mask PNG could not be decoded")
    return np.asarray(image, dtype=np.uint8)


def decode_probabilities(mask: stream_pb2.Mask) -> npt.NDArray[np.uint8]:
    """Each label after the background's 8-bit probability (v/255), ``(labels - 1, H, W)``, from a Mask message
    whose frame asked for them (``Frame.want_probabilities``); ``(0, H, W)`` when it carries none."""
    planes = []
    for png in mask.probability_png:
        image = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None or image.shape != (mask.height, mask.width):
            raise ValueError(f"a probability PNG could not be decoded as {mask.height}x{mask.width} grayscale")
        planes.append(image)
    return np.asarray(np.stack(planes), np.uint8) if planes else np.zeros((0, mask.height, mask.width), np.uint8)


def encode_png(image: npt.NDArray[np.uint8]) -> stream_pb2.EncodedImage:
    """8-bit gray ``(H, W)`` or RGB ``(H, W, 3)`` -> PNG."""
    message = stream_pb2.EncodedImage()
    _fill_png(message, image)
    return message


def encode_tensor(name: str, values: npt.NDArray[np.float32]) -> stream_pb2.Tensor:
    message = stream_pb2.Tensor()
    _fill_tensor(message, name, values)
    return message


# Results are filled in place: protobuf copies a large submessage into its parent several times
# slower than it takes the same payload as bytes.


def _fill_png(message: stream_pb2.EncodedImage, image: npt.NDArray[np.uint8]) -> None:
    ok, png = cv2.imencode(".png", image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise BackendError("PNG encoding of an output image failed")
    message.encoding = stream_pb2.ENCODING_PNG
    message.data = png.tobytes()


def _fill_tensor(message: stream_pb2.Tensor, name: str, values: npt.NDArray[np.float32]) -> None:
    message.name = name
    message.dtype = manifest_pb2.DATA_TYPE_FLOAT32
    message.shape.extend(values.shape)
    message.data = np.ascontiguousarray(values, dtype=np.dtype("<f4")).tobytes()


def decode_tensor(tensor: stream_pb2.Tensor) -> npt.NDArray[np.float32]:
    """Float32 array from a Tensor message (used by clients)."""
    if tensor.dtype != manifest_pb2.DATA_TYPE_FLOAT32:
        raise ValueError(f"tensor {tensor.name} is {manifest_pb2.DataType.Name(tensor.dtype)}, not FLOAT32")
    return np.frombuffer(tensor.data, dtype=np.dtype("<f4")).astype(np.float32).reshape(tuple(tensor.shape))


def fill_result(result: stream_pb2.Result, task: TaskResult, mask_encoding: int) -> None:
    if task.mask is not None:
        mask = result.outputs.add(name="mask").mask
        _fill_mask(mask, task.mask, task.labels, mask_encoding)
        for plane in task.probabilities if task.probabilities is not None else ():
            ok, png = cv2.imencode(".png", plane, _FAST_PNG)
            if not ok:
                raise BackendError("PNG encoding of a label's probabilities failed")
            mask.probability_png.append(png.tobytes())
    if task.class_scores is not None:
        classes = stream_pb2.ClassScores(labels=task.labels, scores=task.class_scores.tolist())
        result.outputs.append(stream_pb2.Output(name="classes", classes=classes))
    if task.boxes is not None:
        result.outputs.append(stream_pb2.Output(name="boxes", boxes=stream_pb2.Boxes(boxes=task.boxes)))
    for name, image in task.images.items():
        _fill_png(result.outputs.add(name=name).image, image)
    for name, values in task.tensors.items():
        _fill_tensor(result.outputs.add(name=name).tensor, name, values)
    result.quantities.extend(task.quantities)
    if task.confidence is not None:
        result.confidence = task.confidence
