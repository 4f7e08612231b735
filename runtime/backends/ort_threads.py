"""How ONNX Runtime's intra-op threads run a model on this machine: chosen by measuring it here.

ONNX Runtime splits each operator of a run over its intra-op pool. Between
two operators of one run the pool's threads either sleep, and are woken for
every operator (on a small CPU model this costs several per cent per frame),
or busy-wait, holding their cores. Between runs they never busy-wait here
(``session.force_spinning_stop``): between frames the cores belong to
decoding, pre- and postprocessing and gRPC.

Whether they busy-wait within a run is a property of the model and the
machine, so with ``spinning="auto"`` it is measured when the model loads:
one session each way, run alternately on zero inputs of the model's shape
within a time budget, and busy-waiting is kept only when its median is at
least ``MIN_GAIN`` faster, since a busy-waiting thread takes its core from
everything else the device does while a frame is inferred. The choice and its
measurements are logged at load and reported by ``edgescope doctor BUNDLE``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgescope.v1 import manifest_pb2

SPINNING_CHOICES = ("auto", "on", "off")
# Busy-waiting must beat sleeping by this much at the median to be kept.
MIN_GAIN = 0.03
# Measuring stops after this long (at least MIN_ROUNDS rounds, one run each way per round).
BUDGET_S = 1.5
MIN_ROUNDS = 3
MAX_ROUNDS = 30

_NUMPY_TYPES: dict[int, type[np.generic]] = {
    manifest_pb2.DATA_TYPE_FLOAT32: np.float32,
    manifest_pb2.DATA_TYPE_FLOAT16: np.float16,
    manifest_pb2.DATA_TYPE_UINT8: np.uint8,
    manifest_pb2.DATA_TYPE_INT8: np.int8,
    manifest_pb2.DATA_TYPE_UINT16: np.uint16,
    manifest_pb2.DATA_TYPE_INT32: np.int32,
    manifest_pb2.DATA_TYPE_INT64: np.int64,
}


@dataclass(frozen=True, slots=True)
class Threading:
    """Intra-op threads per session, whether they busy-wait within a run, and why."""

    threads: int
    spinning: bool
    reason: str

    def describe(self) -> str:
        way = "busy-wait within a run" if self.spinning else "sleep between operators"
        return f"{self.threads} intra-op thread(s), {way} ({self.reason})"


def configure(options: ort.SessionOptions, threads: int, spinning: bool) -> None:
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Busy-waiting, when allowed, ends with the run: never between frames.
    options.add_session_config_entry("session.force_spinning_stop", "1")


def sample_feed(manifest: manifest_pb2.ModelManifest) -> dict[str, npt.NDArray[np.generic]] | None:
    """Zero inputs of the model's shape (a batch of one); None when a dimension other than the batch is dynamic."""
    feed: dict[str, npt.NDArray[np.generic]] = {}
    for tensor in manifest.inputs:
        dims = [dim.size if dim.WhichOneof("kind") == "size" else None for dim in tensor.shape]
        if dims and dims[0] is None:
            dims[0] = 1
        numpy_type = _NUMPY_TYPES.get(tensor.dtype)
        if any(dim is None for dim in dims) or numpy_type is None:
            return None
        feed[tensor.name] = np.zeros([int(dim) for dim in dims if dim is not None], dtype=numpy_type)
    return feed or None


def choose_spinning(
    open_session: Callable[[bool], ort.InferenceSession],
    feed: dict[str, npt.NDArray[np.generic]],
    threads: int,
    budget_s: float = BUDGET_S,
) -> tuple[ort.InferenceSession, Threading]:
    """Measure the model both ways and return the faster session (see the module docstring)."""
    sessions = {spinning: open_session(spinning) for spinning in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for session in sessions.values():
        session.run(None, feed)  # the first run allocates and picks kernels: not timed
    started = time.perf_counter()
    for round_index in range(MAX_ROUNDS):
        if round_index >= MIN_ROUNDS and time.perf_counter() - started > budget_s:
            break
        # Alternate which goes first, so neither always runs on the other's warm caches.
        order = (False, True) if round_index % 2 == 0 else (True, False)
        for spinning in order:
            begin = time.perf_counter()
            sessions[spinning].run(None, feed)
            times[spinning].append(time.perf_counter() - begin)
    sleeping_ms, spinning_ms = (float(np.median(times[way])) * 1e3 for way in (False, True))
    spin = spinning_ms <= sleeping_ms * (1.0 - MIN_GAIN)
    runs = len(times[True])
    measured = f"measured {spinning_ms:.2f} ms busy-waiting vs {sleeping_ms:.2f} ms sleeping, medians of {runs} runs"
    del sessions[not spin]
    return sessions[spin], Threading(threads, spin, measured)
