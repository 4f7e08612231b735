"""One frame through the pipeline: decode -> preprocess -> infer -> postprocess -> encode.

Every stage is timed on the monotonic clock and the timings travel with the
result. This runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import time

from edgescope.errors import EdgescopeError
from edgescope.runtime.models import LoadedModel, ModelRegistry
from edgescope.runtime.pipeline.decode import decode_frame
from edgescope.runtime.pipeline.encode import fill_result
from edgescope.runtime.pipeline.postprocess import postprocess
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.v1 import stream_pb2


class _StageClock:
    def __init__(self, result: stream_pb2.Result) -> None:
        self._result = result
        self._last = time.perf_counter_ns()

    def lap(self, stage: str) -> None:
        now = time.perf_counter_ns()
        self._result.timings.append(stream_pb2.StageTiming(stage=stage, duration_ns=now - self._last))
        self._last = now


def result_for(frame: stream_pb2.Frame) -> stream_pb2.Result:
    return stream_pb2.Result(stream_id=frame.stream_id, seq=frame.seq, capture_time_ns=frame.capture_time_ns)


def error_result(frame: stream_pb2.Frame, error: Exception) -> stream_pb2.Result:
    result = result_for(frame)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_ERROR
    result.status.reason = (
        str(error) if isinstance(error, EdgescopeError) else f"internal error: {type(error).__name__}: {error}"
    )
    return result


def run_model(model: LoadedModel, frame: stream_pb2.Frame, queued_ns: int) -> stream_pb2.Result:
    """Process one frame; raises EdgescopeError for bad input or a failing backend."""
    result = result_for(frame)
    result.timings.append(stream_pb2.StageTiming(stage="queue", duration_ns=queued_ns))
    clock = _StageClock(result)
    pixels = decode_frame(frame)
    clock.lap("decode")
    tensor, geometry = preprocess(pixels, model.manifest.preprocessing)
    clock.lap("preprocess")
    outputs = model.session.infer({model.manifest.inputs[0].name: tensor})
    clock.lap("infer")
    spacing = (
        frame.spacing
        if frame.HasField("spacing") and frame.spacing.row_mm > 0 and frame.spacing.column_mm > 0
        else None
    )
    task = postprocess(outputs, model.manifest, geometry, spacing)
    clock.lap("postprocess")
    fill_result(result, task, frame.mask_encoding)
    result.provenance.CopyFrom(model.provenance)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_OK
    clock.lap("encode")
    return result


def process_frame(
    registry: ModelRegistry, frame: stream_pb2.Frame, model_name: str, received_ns: int
) -> stream_pb2.Result:
    """Look up the model and run it; the queue time is measured from ``received_ns``."""
    model = registry.get(model_name)
    return run_model(model, frame, time.perf_counter_ns() - received_ns)
