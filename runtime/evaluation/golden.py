"""Golden frames: a bundle's own test, which every device runs before serving it.

Export keeps a few of the gate's preprocessed frames with what they must
give: the reference's outputs (PyTorch) and, for reduced precision, the
outputs the gate accepted (the Q/DQ graph as fake-quant, the FP16 graph).
They sit in ``golden.npz`` (numpy's compressed archive; plain arrays, no
pickles), listed and hashed in the manifest like every file, with the limits
the gate applied (``ModelManifest.golden``).

Which frames: for a stateful model, the first frames of the gate's stream (a
sequence, replayed in order from the initial state); otherwise the frames
where the gated graph came closest to its limits, and an even spread of the
rest.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgescope.bundle import Bundle
from edgescope.errors import BundleError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.evaluation.limits import GateThresholds
from edgescope.runtime.evaluation.metrics import Comparison
from edgescope.runtime.evaluation.runners import Run, SourceFrames, describe
from edgescope.runtime.pipeline.state import is_stateful, source_inputs
from edgescope.v1 import manifest_pb2

GOLDEN_FILE = "golden.npz"
DEFAULT_GOLDEN_FRAMES = 8

Tensor = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class GoldenData:
    """The frames of ``golden.npz`` and their outputs, in replay order."""

    inputs: list[Tensor]
    # A model fed by several sources: each frame's other sources' inputs by input name; else None.
    sources: list[dict[str, Tensor]] | None
    reference: list[Outputs]
    # The outputs the gate accepted (reduced precision), or None.
    gated: list[Outputs] | None


def select_frames(count: int, comparison: Comparison, sequence: bool) -> list[int]:
    """Indices of the gate's frames to keep, in order."""
    total = len(comparison.frame_errors)
    if count >= total:
        return list(range(total))
    if sequence:
        return list(range(count))
    scores = comparison.frame_scores or [0.0] * total
    by_agreement = sorted(range(total), key=lambda i: (scores[i], -comparison.frame_errors[i]))
    hardest = by_agreement[: count // 2]
    rest = [i for i in range(total) if i not in hardest]
    spread = np.linspace(0, len(rest) - 1, count - len(hardest)).round().astype(int)
    return sorted({*hardest, *(rest[int(k)] for k in spread)})


def write_golden(
    bundle_dir: Path,
    manifest: manifest_pb2.ModelManifest,
    inputs: Sequence[Tensor],
    reference: Run,
    gated: Run | None,
    indices: Sequence[int],
    limits: GateThresholds,
    data_source: str,
    sources: SourceFrames | None = None,
) -> None:
    """Write ``golden.npz`` with the frames at ``indices`` and describe it in ``manifest.golden``.

    The manifest is not written here: ``write_manifest`` lists and hashes the file with the rest.
    """
    names = [spec.name for spec in manifest.outputs]
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    runs = [("reference", reference)] + ([("gated", gated)] if gated is not None else [])
    for slot, index in enumerate(indices):
        arrays[f"input_{slot}"] = np.asarray(inputs[index], dtype=np.float32)
        for name, tensor in (sources[index] if sources is not None else {}).items():
            arrays[f"source_{slot}_{name}"] = np.asarray(tensor, dtype=np.float32)
        for kind, run in runs:
            for j, name in enumerate(names):
                if name not in run.outputs[index]:
                    raise BundleError(f"{describe(run.info)} gave no output {name!r} for the golden frames")
                arrays[f"{kind}_{slot}_{j}"] = np.asarray(run.outputs[index][name])
    with (bundle_dir / GOLDEN_FILE).open("wb") as handle:
        np.savez_compressed(handle, allow_pickle=False, **arrays)
    manifest.golden.CopyFrom(
        manifest_pb2.GoldenFrames(
            path=GOLDEN_FILE,
            frames=len(indices),
            sequence=is_stateful(manifest),
            data_source=data_source,
            gate_frames=list(indices),
            outputs=names,
            reference_runner=reference.info,
            gated_runner=gated.info if gated is not None else None,
            limits=limits.to_proto(),
        )
    )


def read_golden(bundle: Bundle) -> GoldenData:
    """The bundle's golden frames, checked against the sha256 its manifest lists; BundleError says what is wrong."""
    golden = bundle.manifest.golden
    if not golden.path:
        raise BundleError(
            f"{bundle.path}: the bundle has no golden frames, so no device can check that it runs the model "
            "as it was gated; re-export it, or add them with `edgescope validate BUNDLE --factory ...`"
        )
    # The bytes checked against the manifest are the bytes loaded: no second read of the file.
    data = bundle.read_file(golden.path)
    count, outputs = golden.frames, list(golden.outputs)
    if not count or not outputs:
        raise BundleError(f"{bundle.path}: the manifest lists no golden frames or outputs in {golden.path}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            inputs = [np.asarray(archive[f"input_{i}"], dtype=np.float32) for i in range(count)]
            names = [binding.input for binding in source_inputs(bundle.manifest)]
            sources = (
                [{n: np.asarray(archive[f"source_{i}_{n}"], dtype=np.float32) for n in names} for i in range(count)]
                if names
                else None
            )

            def outputs_of(kind: str) -> list[Outputs]:
                return [{name: archive[f"{kind}_{i}_{j}"] for j, name in enumerate(outputs)} for i in range(count)]

            reference = outputs_of("reference")
            gated = outputs_of("gated") if golden.HasField("gated_runner") else None
    except (KeyError, ValueError, OSError) as exc:
        raise BundleError(f"{bundle.path}: {golden.path} is not a readable golden-frame archive: {exc}") from exc
    return GoldenData(inputs, sources, reference, gated)
