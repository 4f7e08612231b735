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
within a time budget, first alone, then while another thread keeps one core
busy (as a client drawing and recording overlays, or a second stream, does
on a small device). Busy-waiting is kept only when its median is at least
``MIN_GAIN`` faster in both: alone it is usually a few per cent faster, but
when a core is shared a busy-waiting thread that loses its core stalls every
operator (measured on a 2-core machine streaming the demo while recording:
p50 end to end 40-146 ms busy-waiting vs 24-32 ms sleeping). The choice and
its measurements are logged at load and reported by ``edgescope doctor BUNDLE``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgescope.v1 import manifest_pb2

SPINNING_CHOICES = ("auto", "on", "off")
# Busy-waiting must beat sleeping by this much at the median to be kept.
MIN_GAIN = 0.03
# Each measurement (alone, then with a busy core) stops after this long, at least MIN_ROUNDS rounds
# of one run each way.
BUDGET_S = 1.0
MIN_ROUNDS = 3
MAX_ROUNDS = 20
# What the competing thread hashes per step: hashlib lets go of the GIL for it, so only a core is taken.
_LOAD_BYTES = b"\0" * (1 << 20)

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
    """Measure the model both ways, alone and beside a busy core, and return the chosen session."""
    sessions = {spinning: open_session(spinning) for spinning in (False, True)}
    for session in sessions.values():
        session.run(None, feed)  # the first run allocates and picks kernels: not timed
    alone = _medians_ms(sessions, feed, budget_s)
    with _busy_core():
        shared = _medians_ms(sessions, feed, budget_s)
    spin = all(times[True] <= times[False] * (1.0 - MIN_GAIN) for times in (alone, shared))
    measured = (
        f"measured busy-waiting vs sleeping: {alone[True]:.2f} vs {alone[False]:.2f} ms alone, "
        f"{shared[True]:.2f} vs {shared[False]:.2f} ms beside a busy core"
    )
    del sessions[not spin]
    return sessions[spin], Threading(threads, spin, measured)


def _medians_ms(
    sessions: dict[bool, ort.InferenceSession], feed: dict[str, npt.NDArray[np.generic]], budget_s: float
) -> dict[bool, float]:
    times: dict[bool, list[float]] = {False: [], True: []}
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
    return {way: float(np.median(values)) * 1e3 for way, values in times.items()}


@contextmanager
def _busy_core() -> Iterator[None]:
    """Keep one core busy (and only one) while the body runs."""
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            hashlib.sha256(_LOAD_BYTES).digest()

    worker = threading.Thread(target=load, name="edgescope-threading-load", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
