"""Runners: a ``Feed -> Outputs`` callable and a description of what computes it.

The evaluator compares two runners on the same frames, whatever they are:

============ =================================================================
pytorch      the original model (``edgescope.export.runs.torch_runner``)
stored       outputs saved in the bundle's golden frames
onnxruntime  the bundle's graph: exact for FP32/FP16; a Q/DQ graph either as
             fake-quant (float arithmetic, rounded at each Q: what TensorRT
             reproduces, the same on every CPU) or fused into integer kernels
tensorrt     an engine under ``engines/`` (needs a GPU and TensorRT)
remote       a Triton/KServe server: its session's ``infer``, with ``remote_info``
============ =================================================================

Frames run as one stream (``run_stream``): recurrent state and the previous
frame carry over exactly as the runtime carries them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgescope.bundle import Bundle, sha256_file
from edgescope.engines import PRECISION_NAMES
from edgescope.errors import BackendError
from edgescope.runtime.backends.base import Feed, Outputs
from edgescope.runtime.backends.onnxruntime import FAKE_QUANT, INTEGER, NO_QUANT, onnxruntime_info, session_options
from edgescope.runtime.backends.remote import remote_info
from edgescope.runtime.backends.tensorrt import tensorrt_info
from edgescope.runtime.pipeline.state import ModelState, frame_input
from edgescope.v1 import manifest_pb2

Infer = Callable[[Feed], Outputs]
Frames = Sequence[npt.NDArray[np.float32]]
# A model fed by several sources: per frame, the other sources' inputs by input name.
SourceFrames = Sequence[Mapping[str, npt.NDArray[np.float32]]]

_QUANT_WORDS = {FAKE_QUANT: "fake-quant", INTEGER: "integer kernels"}


@dataclass(frozen=True, slots=True)
class Runner:
    infer: Infer
    info: manifest_pb2.RunnerInfo


@dataclass(frozen=True, slots=True)
class Run:
    """A runner's outputs over a list of frames."""

    info: manifest_pb2.RunnerInfo
    outputs: list[Outputs]


def run(
    runner: Runner, manifest: manifest_pb2.ModelManifest, frames: Frames, sources: SourceFrames | None = None
) -> Run:
    """``runner`` over ``frames`` as one stream (``sources``: each frame's other sources' inputs)."""
    return Run(runner.info, run_stream(runner.infer, manifest, frames, sources)[1])


def describe(info: manifest_pb2.RunnerInfo) -> str:
    """``onnxruntime 1.32.0 cpu int8 fake-quant`` and the like."""
    words = [info.kind, info.version, info.device, PRECISION_NAMES.get(info.precision, "")]
    words.append(_QUANT_WORDS.get(info.quant_execution, ""))
    text = " ".join(w for w in words if w)
    return f"{text} ({info.detail})" if info.detail else text


def run_stream(
    infer: Infer, manifest: manifest_pb2.ModelManifest, frames: Frames, sources: SourceFrames | None = None
) -> tuple[list[Feed], list[Outputs]]:
    """Feeds and outputs of every frame, in order, as one stream (with its other sources' inputs, if any)."""
    state = ModelState(manifest)
    feeds: list[Feed] = []
    outputs: list[Outputs] = []
    for index, frame in enumerate(frames):
        feed = state.feed(frame, sources[index] if sources is not None else None)
        result = infer(feed)
        state.update(frame, result)
        feeds.append(feed)
        outputs.append(result)
    return feeds, outputs


def onnxruntime_runner(
    path: Path,
    precision: manifest_pb2.Precision.ValueType,
    *,
    quant: manifest_pb2.QuantExecution.ValueType | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
) -> Runner:
    """The ``precision`` graph at ``path`` in ONNX Runtime; a Q/DQ (INT8) one as fake-quant by default."""
    qdq = precision == manifest_pb2.PRECISION_INT8
    mode = (INTEGER if quant == INTEGER else FAKE_QUANT) if qdq else NO_QUANT
    try:
        session = ort.InferenceSession(
            str(path), sess_options=session_options(mode, threads), providers=list(providers)
        )
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise BackendError(f"onnxruntime cannot load {path}: {exc}") from exc
    names = [o.name for o in session.get_outputs()]

    def infer(feed: Feed) -> Outputs:
        return {name: np.asarray(v) for name, v in zip(names, session.run(names, dict(feed)), strict=True)}

    return Runner(infer, onnxruntime_info(precision, mode, providers, sha256_file(path)))


def stored_runner(
    manifest: manifest_pb2.ModelManifest, inputs: Frames, outputs: Sequence[Outputs], info: manifest_pb2.RunnerInfo
) -> Runner:
    """Saved outputs, answered in order; a frame other than the saved one is an error, not a wrong answer."""
    name = frame_input(manifest)
    position = iter(range(len(inputs)))

    def infer(feed: Feed) -> Outputs:
        index = next(position, None)
        if index is None or not np.array_equal(np.asarray(feed[name]), inputs[index]):
            raise BackendError("stored outputs are replayed in the order they were saved, for the frames saved")
        return dict(outputs[index])

    return Runner(infer, info)


@contextmanager
def tensorrt_runner(bundle: Bundle, entry: manifest_pb2.EngineEntry, *, device: int = 0) -> Iterator[Runner]:
    """The engine ``entry`` names, run by the runtime's TensorRT session (needs a GPU and TensorRT)."""
    from edgescope.runtime.backends.tensorrt import TensorRTSession

    plan = bundle.path / entry.plan
    with TensorRTSession(bundle.manifest, plan.read_bytes(), entry, device=device) as session:
        yield Runner(session.infer, session.describe())


__all__ = [
    "FAKE_QUANT",
    "INTEGER",
    "NO_QUANT",
    "Run",
    "Runner",
    "describe",
    "onnxruntime_info",
    "onnxruntime_runner",
    "remote_info",
    "run",
    "run_stream",
    "session_options",
    "stored_runner",
    "tensorrt_info",
    "tensorrt_runner",
]
