"""Frames through the whole frame path of every model before the server says it is ready.

A model's load already runs its session on a zero tensor and on its golden
frames; what that leaves cold is the rest of a frame's path: the decoder,
the resize and normalisation at a camera's size, postprocessing and the mask
encoder, on the very instance threads that will run them, and the memory all
of that takes. Without this the first client's first frames paid for it
(2-3x their steady latency on the 2-core reference machine, and a backlog
behind them). ``warm_up`` sends each model a few synthetic frames, at its
input size and at twice it, through its worker exactly as a stream's frames
go, and serialises each Result; the model's statistics are cleared after it:
they count what clients asked for.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import numpy.typing as npt

from edgescope.errors import EdgescopeError
from edgescope.runtime.pipeline.decode import encode_raw_into
from edgescope.runtime.pipeline.preprocess import input_channels
from edgescope.runtime.pipeline.signal import window_of
from edgescope.runtime.pipeline.state import StreamState, source_inputs
from edgescope.runtime.server.registry import ServedModel
from edgescope.runtime.server.stages import FramePixels, frame_jobs, job_for
from edgescope.v1 import manifest_pb2, stream_pb2

logger = logging.getLogger(__name__)

FRAMES_PER_SIZE = 4
LANE = "warm-up"


def synthetic_frame(height: int, width: int, channels: int, seq: int) -> npt.NDArray[np.uint8]:
    """A gradient with a bright disc that moves with ``seq``: something for postprocessing to find."""
    rows, columns = np.mgrid[0:height, 0:width]
    image = (rows * 96 // max(1, height) + columns * 96 // max(1, width)).astype(np.uint8)
    centre_row, centre_column = height // 2 + seq * height // 16, width // 2
    disc = (rows - centre_row) ** 2 + (columns - centre_column) ** 2 < (min(height, width) // 6) ** 2
    image[disc] = 220
    return image if channels == 1 else np.repeat(image[:, :, None], channels, axis=2)


def _partner(model: str, binding: manifest_pb2.InputBinding, scale: int, seq: int) -> FramePixels:
    """A frame of another source: a window of a signal source (silence), or an image at its input size."""
    if not binding.HasField("signal"):
        return FramePixels(_frame(model, binding.preprocessing, scale, seq))
    spec = binding.signal
    window = window_of(np.zeros((spec.channels, spec.samples)), spec.sample_rate_hz, spec.units)
    return FramePixels(stream_pb2.Frame(stream_id=LANE, seq=seq, model=model, source=binding.source, signal=window))


def _frame(model: str, spec: manifest_pb2.Preprocessing, scale: int, seq: int) -> stream_pb2.Frame:
    frame = stream_pb2.Frame(stream_id=LANE, seq=seq, model=model)
    encode_raw_into(frame.raw, synthetic_frame(spec.height * scale, spec.width * scale, input_channels(spec), seq))
    return frame


async def warm_up(model: ServedModel) -> None:
    """Run ``model``'s frame path on synthetic frames (see the module docstring); failures are logged, not raised."""
    spec = model.manifest.preprocessing
    state = StreamState()
    started = time.perf_counter()
    try:
        for scale in (1, 2):
            for seq in range(FRAMES_PER_SIZE):
                frame = _frame(model.name, spec, scale, seq)
                # A model fed by several sources gets a frame of each at its own input size.
                bindings = source_inputs(model.manifest)
                partners = {binding.source: _partner(model.name, binding, scale, seq) for binding in bindings}
                (job,) = frame_jobs(
                    frame, [model], FramePixels(frame), time.perf_counter_ns(), want_thumbnail=False, partners=partners
                )
                finished = await model.infer(job_for(job, LANE, state, reset=seq == 0))
                finished.result.SerializeToString()
    except EdgescopeError as exc:
        logger.warning("warming up %s on synthetic frames failed (%s); its first frames may be slow", model.name, exc)
        return
    except Exception:
        # A model that cannot take a synthetic frame still serves the frames it was made for.
        logger.exception("warming up %s on synthetic frames failed; its first frames may be slow", model.name)
        return
    finally:
        model.statistics.clear()
    logger.info("warmed up %s's frame path in %.0f ms", model.name, (time.perf_counter() - started) * 1e3)
