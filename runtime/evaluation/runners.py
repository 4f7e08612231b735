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

import os
from collections.abc import Callable, Iterator, Sequence
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
from edgescope.runtime.pipeline.state import ModelState, frame_input
from edgescope.v1 import manifest_pb2

Infer = Callable[[Feed], Outputs]
Frames = Sequence[npt.NDArray[np.float32]]

FAKE_QUANT = manifest_pb2.QUANT_EXECUTION_FAKE_QUANT
INTEGER = manifest_pb2.QUANT_EXECUTION_INTEGER
NO_QUANT = manifest_pb2.QUANT_EXECUTION_NONE
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


def run(runner: Runner, manifest: manifest_pb2.ModelManifest, frames: Frames) -> Run:
    """``runner`` over ``frames`` as one stream."""
    return Run(runner.info, run_stream(runner.infer, manifest, frames)[1])


def describe(info: manifest_pb2.RunnerInfo) -> str:
    """``onnxruntime 1.32.0 cpu int8 fake-quant`` and the like."""
    words = [info.kind, info.version, info.device, PRECISION_NAMES.get(info.precision, "")]
    words.append(_QUANT_WORDS.get(info.quant_execution, ""))
    text = " ".join(w for w in words if w)
    return f"{text} ({info.detail})" if info.detail else text


def run_stream(infer: Infer, manifest: manifest_pb2.ModelManifest, frames: Frames) -> tuple[list[Feed], list[Outputs]]:
    """Feeds and outputs of every frame, in order, as one stream."""
    state = ModelState(manifest)
    feeds: list[Feed] = []
    outputs: list[Outputs] = []
    for frame in frames:
        feed = state.feed(frame)
        result = infer(feed)
        state.update(frame, result)
        feeds.append(feed)
        outputs.append(result)
    return feeds, outputs


def session_options(quant: manifest_pb2.QuantExecution.ValueType, threads: int | None = None) -> ort.SessionOptions:
    """ONNX Runtime options that run a graph's Q/DQ nodes as ``quant`` says.

    Fake-quant keeps every QuantizeLinear/DequantizeLinear as its own node
    (``session.disable_quant_qdq``) and stops at the basic optimisations
    (constant folding, no layout or kernel fusions), so convolutions and
    matrix products run in float and no integer kernel is ever chosen.
    Otherwise every optimisation is on: Q/DQ groups become QLinearConv and
    the like, whose results depend on the CPU's integer instructions.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    if quant == FAKE_QUANT:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def onnxruntime_info(
    precision: manifest_pb2.Precision.ValueType,
    quant: manifest_pb2.QuantExecution.ValueType,
    providers: Sequence[str],
    artifact_sha256: str,
) -> manifest_pb2.RunnerInfo:
    cpu_only = list(providers) == ["CPUExecutionProvider"]
    return manifest_pb2.RunnerInfo(
        kind="onnxruntime",
        version=ort.__version__,
        device="cpu" if cpu_only else providers[0].removesuffix("ExecutionProvider").lower(),
        precision=precision,
        quant_execution=quant,
        detail="" if cpu_only else ",".join(providers),
        artifact_sha256=artifact_sha256,
    )


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


def tensorrt_info(entry: manifest_pb2.EngineEntry, plan_sha256: str, device: int) -> manifest_pb2.RunnerInfo:
    int8 = entry.precision == manifest_pb2.PRECISION_INT8
    return manifest_pb2.RunnerInfo(
        kind="tensorrt",
        version=entry.tensorrt_version,
        device=f"cuda:{device}",
        precision=entry.precision,
        quant_execution=INTEGER if int8 else NO_QUANT,
        detail=entry.plan,
        artifact_sha256=plan_sha256,
    )


@contextmanager
def tensorrt_runner(bundle: Bundle, entry: manifest_pb2.EngineEntry, *, device: int = 0) -> Iterator[Runner]:
    """The engine ``entry`` names, run by the runtime's TensorRT session (needs a GPU and TensorRT)."""
    from edgescope.runtime.backends.tensorrt import TensorRTSession

    plan = bundle.path / entry.plan
    with TensorRTSession(bundle.manifest, plan, device=device) as session:
        yield Runner(session.infer, tensorrt_info(entry, sha256_file(plan), device))


def remote_info(
    url: str, model: str, version: str, precision: manifest_pb2.Precision.ValueType
) -> manifest_pb2.RunnerInfo:
    """A Triton/KServe v2 server's model: what its ``infer`` is, for reports and provenance."""
    return manifest_pb2.RunnerInfo(
        kind="remote",
        device=f"remote:{url}",
        precision=precision,
        detail=f"model {model} version {version or 'latest'}",
    )
