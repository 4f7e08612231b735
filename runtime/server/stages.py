"""One frame split into the stages the scheduler overlaps across frames.

``prepare`` (decode, then preprocess for each model) and ``finish``
(postprocess, then encode) run on worker threads while another frame of the
same stream is in inference. Every stage's duration travels with the answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.decode import DEFAULT_LIMITS, FrameLimits, decode_frame
from edgescope.runtime.pipeline.encode import fill_result
from edgescope.runtime.pipeline.postprocess import postprocess
from edgescope.runtime.pipeline.preprocess import Geometry, preprocess
from edgescope.runtime.pipeline.state import StreamState, frame_input, is_stateful
from edgescope.runtime.server.registry import LoadedModel
from edgescope.runtime.server.shm import REGIONS
from edgescope.v1 import stream_pb2


@dataclass(slots=True)
class ModelInput:
    """One model's input tensor for one frame, and where the frame sits inside it."""

    model: LoadedModel
    tensor: npt.NDArray[np.float32]
    geometry: Geometry
    preprocess_ns: int


@dataclass(slots=True)
class Prepared:
    frame: stream_pb2.Frame
    decode_ns: int
    inputs: list[ModelInput] = field(default_factory=list)


def prepare(frame: stream_pb2.Frame, models: list[LoadedModel], limits: FrameLimits = DEFAULT_LIMITS) -> Prepared:
    """Decode once and preprocess for each model (they may want different sizes)."""
    start = time.perf_counter_ns()
    pixels = decode_frame(frame, REGIONS.view, limits)
    prepared = Prepared(frame=frame, decode_ns=time.perf_counter_ns() - start)
    for model in models:
        begin = time.perf_counter_ns()
        tensor, geometry = preprocess(pixels, model.manifest.preprocessing)
        prepared.inputs.append(ModelInput(model, tensor, geometry, time.perf_counter_ns() - begin))
    return prepared


def infer(model_input: ModelInput, stream: StreamState, reset: bool) -> tuple[Outputs, int]:
    """Run one model on one frame, carrying the stream's state if the model has any."""
    model = model_input.model
    start = time.perf_counter_ns()
    if is_stateful(model.manifest):
        state = stream.for_model(model.name, model.manifest)
        # Held from feed to update, so frames of one stream cannot interleave their state.
        with state.lock:
            if reset:
                state.reset()
            outputs = model.session.infer(state.feed(model_input.tensor))
            state.update(model_input.tensor, outputs)
    else:
        outputs = model.session.infer({frame_input(model.manifest): model_input.tensor})
    return outputs, time.perf_counter_ns() - start


def _spacing(frame: stream_pb2.Frame) -> stream_pb2.PixelSpacing | None:
    if frame.HasField("spacing") and frame.spacing.row_mm > 0 and frame.spacing.column_mm > 0:
        return frame.spacing
    return None


def finish(model_input: ModelInput, outputs: Outputs, infer_ns: int, frame: stream_pb2.Frame) -> stream_pb2.Result:
    """Postprocess and encode one model's outputs; the Result carries its stage timings."""
    model = model_input.model
    result = stream_pb2.Result()
    result.timings.add(stage="preprocess", duration_ns=model_input.preprocess_ns)
    result.timings.add(stage="infer", duration_ns=infer_ns)
    start = time.perf_counter_ns()
    task = postprocess(outputs, model.manifest, model_input.geometry, _spacing(frame))
    encoded = time.perf_counter_ns()
    result.timings.add(stage="postprocess", duration_ns=encoded - start)
    fill_result(result, task, frame.mask_encoding)
    result.provenance.CopyFrom(model.provenance)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_OK
    result.timings.add(stage="encode", duration_ns=time.perf_counter_ns() - encoded)
    return result


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
