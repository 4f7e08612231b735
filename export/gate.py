"""The accuracy gate, shared by export and ``edgescope validate``.

The bundle's graph must reproduce the PyTorch original on representative
frames: ONNX Runtime runs it exactly as written (FP32, FP16) or, for a Q/DQ
INT8 graph, as fake-quant, the arithmetic TensorRT reproduces and the same on
every CPU. The frames it judged become the bundle's golden frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError, ExportError
from edgescope.runtime.evaluation.golden import select_frames, write_golden
from edgescope.runtime.evaluation.limits import GateThresholds
from edgescope.runtime.evaluation.metrics import Comparison
from edgescope.runtime.evaluation.report import evaluate
from edgescope.runtime.evaluation.runners import Run, SourceFrames
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.pipeline.state import is_stateful
from edgescope.runtime.sources import open_source
from edgescope.v1 import manifest_pb2


@dataclass(frozen=True, slots=True)
class Gate:
    """The graph's outputs on the gate's frames, its report and the per-frame comparison."""

    candidate: Run
    report: manifest_pb2.ValidationReport
    comparison: Comparison


def representative_inputs(data: str, samples: int, spec: manifest_pb2.Preprocessing) -> list[npt.NDArray[np.float32]]:
    """Preprocessed frames from a source, exactly as the runtime would feed them."""
    if samples <= 0:
        raise ConfigError("validation needs at least one sample")
    inputs = []
    with open_source(data) as source:
        for frame in source:
            inputs.append(preprocess(frame.pixels, spec, frame.pixel_transform)[0])
            if len(inputs) == samples:
                break
    if not inputs:
        raise ExportError(f"validation source {data} yielded no frames")
    return inputs


def judge(
    reference: Run,
    candidate: Run,
    manifest: manifest_pb2.ModelManifest,
    limits: GateThresholds,
    data_source: str,
    machine: manifest_pb2.Machine,
) -> Gate:
    report, comparison = evaluate(reference, candidate, manifest, limits, data_source=data_source, machine=machine)
    return Gate(candidate, report, comparison)


def keep_golden(
    bundle_dir: Path,
    manifest: manifest_pb2.ModelManifest,
    frames: Sequence[npt.NDArray[np.float32]],
    reference: Run,
    gate: Gate,
    count: int,
    limits: GateThresholds,
    data_source: str,
    sources: SourceFrames | None = None,
) -> None:
    """Write the golden frames: the reference's outputs and, below FP32, the outputs the gate accepted."""
    if count <= 0:
        raise ConfigError("a bundle needs at least one golden frame")
    indices = select_frames(count, gate.comparison, is_stateful(manifest))
    gated = gate.candidate if manifest.precision != manifest_pb2.PRECISION_FP32 else None
    write_golden(bundle_dir, manifest, frames, reference, gated, indices, limits, data_source, sources)
