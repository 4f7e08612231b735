"""One frame split into the stages a stream overlaps across frames.

``prepare`` (decode, then preprocess for each model) and ``finish``
(postprocess, then encode) run on the frame threads while another frame of
the same stream is in inference; inference itself is a ``Job`` for the
model's worker (``job_for``). Every stage's duration travels with the answer.
Streams and ``Infer`` both go through these functions, so a frame gets the
same answer either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgescope.runtime.pipeline.decode import DEFAULT_LIMITS, FrameLimits, SharedMemoryView, decode_frame
from edgescope.runtime.pipeline.encode import fill_result
from edgescope.runtime.pipeline.postprocess import postprocess
from edgescope.runtime.pipeline.preprocess import Geometry, preprocess
from edgescope.runtime.pipeline.state import StreamState, frame_input, is_stateful
from edgescope.runtime.render.preview import preview_jpeg, thumbnail
from edgescope.runtime.server.registry import ServedModel
from edgescope.runtime.server.workers import Job, JobResult
from edgescope.v1 import stream_pb2


@dataclass(slots=True)
class ModelInput:
    """One model's input tensor for one frame, and where the frame sits inside it."""

    model: ServedModel
    tensor: npt.NDArray[np.float32]
    geometry: Geometry
    preprocess_ns: int


@dataclass(slots=True)
class Prepared:
    decode_ns: int
    inputs: list[ModelInput] = field(default_factory=list)
    # A small display copy of the frame, made only when telemetry asked for a preview.
    thumbnail: npt.NDArray[np.uint8] | None = None


@dataclass(slots=True)
class Finished:
    result: stream_pb2.Result
    # The preview JPEG for telemetry, when a thumbnail was made.
    preview: bytes | None = None


def prepare(
    frame: stream_pb2.Frame,
    models: list[ServedModel],
    shared_memory: SharedMemoryView | None,
    limits: FrameLimits = DEFAULT_LIMITS,
    want_thumbnail: bool = False,
) -> Prepared:
    """Decode once (within ``limits``) and preprocess for each model (they may want different sizes)."""
    start = time.perf_counter_ns()
    pixels = decode_frame(frame, shared_memory, limits)
    prepared = Prepared(decode_ns=time.perf_counter_ns() - start)
    # DICOM frames carry how stored values become display values (modality LUT, window, MONOCHROME1).
    transform = frame.pixel_transform if frame.HasField("pixel_transform") else None
    for model in models:
        begin = time.perf_counter_ns()
        tensor, geometry = preprocess(pixels, model.manifest.preprocessing, transform)
        prepared.inputs.append(ModelInput(model, tensor, geometry, time.perf_counter_ns() - begin))
    if want_thumbnail:
        prepared.thumbnail = thumbnail(pixels, transform)
    return prepared


def job_for(model_input: ModelInput, lane: str, stream: StreamState, reset: bool) -> Job:
    """The worker job for one model on one frame, carrying the stream's state if the model has any."""
    model = model_input.model
    manifest = model.manifest
    state = stream.for_model(model.name, manifest) if is_stateful(manifest) else None
    return Job(
        lane=lane,
        tensor=model_input.tensor,
        frame_input=frame_input(manifest),
        state=state,
        reset_state=reset,
        batchable=state is None and model.batchable,
    )


def _spacing(frame: stream_pb2.Frame) -> stream_pb2.PixelSpacing | None:
    if frame.HasField("spacing") and frame.spacing.row_mm > 0 and frame.spacing.column_mm > 0:
        return frame.spacing
    return None


def finish(
    model_input: ModelInput, inferred: JobResult, frame: stream_pb2.Frame, thumb: npt.NDArray[np.uint8] | None = None
) -> Finished:
    """Postprocess and encode one model's outputs; the Result carries its stage timings."""
    model = model_input.model
    result = stream_pb2.Result()
    result.timings.add(stage="preprocess", duration_ns=model_input.preprocess_ns)
    result.timings.add(stage="infer", duration_ns=inferred.infer_ns)
    start = time.perf_counter_ns()
    task = postprocess(inferred.outputs, model.manifest, model_input.geometry, _spacing(frame), frame.regions)
    encoded = time.perf_counter_ns()
    result.timings.add(stage="postprocess", duration_ns=encoded - start)
    fill_result(result, task, frame.mask_encoding)
    result.provenance.CopyFrom(inferred.provenance)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_OK
    result.timings.add(stage="encode", duration_ns=time.perf_counter_ns() - encoded)
    preview = None
    if thumb is not None:
        caption = [f"{frame.stream_id} seq {frame.seq} {model.name}"]
        preview = preview_jpeg(thumb, task.mask, caption)
    return Finished(result, preview)


def finish_all(
    inputs: list[ModelInput], inferred: list[JobResult], frame: stream_pb2.Frame, prepared: Prepared, queued_ns: int
) -> Finished:
    """The frame's answer: the first model's result, the others' in ``model_results``."""
    first = finish(inputs[0], inferred[0], frame, prepared.thumbnail)
    stamp(first.result, frame, queued_ns, prepared.decode_ns)
    for model_input, extra in zip(inputs[1:], inferred[1:], strict=True):
        first.result.model_results.append(
            as_model_result(model_input.model.name, finish(model_input, extra, frame).result)
        )
    return first


def stamp(result: stream_pb2.Result, frame: stream_pb2.Frame, queued_ns: int, decode_ns: int) -> None:
    """Give a model's result the frame's identity and the frame-level stage timings."""
    result.stream_id, result.seq, result.capture_time_ns = frame.stream_id, frame.seq, frame.capture_time_ns
    result.timings.insert(0, stream_pb2.StageTiming(stage="decode", duration_ns=decode_ns))
    result.timings.insert(0, stream_pb2.StageTiming(stage="queue", duration_ns=queued_ns))


def as_model_result(model: str, result: stream_pb2.Result) -> stream_pb2.ModelResult:
    return stream_pb2.ModelResult(
        model=model,
        status=result.status,
        outputs=result.outputs,
        quantities=result.quantities,
        timings=result.timings,
        provenance=result.provenance,
    )
