"""One frame through every stage at once, for unary calls (``Infer``).

Streams go through ``scheduler``, which overlaps the same stages across
frames; both paths share ``stages`` so a frame gives the same answer either way.
This runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import time

from edgescope.runtime.pipeline.decode import DEFAULT_LIMITS, FrameLimits
from edgescope.runtime.pipeline.state import StreamState
from edgescope.runtime.server.registry import LoadedModel, ModelRegistry
from edgescope.runtime.server.stages import finish, infer, prepare, stamp
from edgescope.v1 import stream_pb2


def run_model(
    model: LoadedModel,
    frame: stream_pb2.Frame,
    queued_ns: int,
    stream: StreamState | None = None,
    limits: FrameLimits = DEFAULT_LIMITS,
) -> stream_pb2.Result:
    """Process one frame; raises EdgescopeError for bad input or a failing backend.

    ``stream`` carries recurrent state and the previous frame between a
    stream's frames; without it every frame starts from the initial state.
    """
    prepared = prepare(frame, [model], limits)
    (model_input,) = prepared.inputs
    outputs, infer_ns = infer(model_input, stream or StreamState(), frame.reset_state)
    result = finish(model_input, outputs, infer_ns, frame)
    stamp(result, frame, queued_ns, prepared.decode_ns)
    return result


def process_frame(
    registry: ModelRegistry,
    frame: stream_pb2.Frame,
    model_name: str,
    received_ns: int,
    limits: FrameLimits = DEFAULT_LIMITS,
) -> stream_pb2.Result:
    """Look up the model and run it; the queue time is measured from ``received_ns``."""
    model = registry.acquire(model_name)
    try:
        return run_model(model, frame, time.perf_counter_ns() - received_ns, limits=limits)
    finally:
        registry.release(model)
