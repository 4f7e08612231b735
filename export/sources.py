"""A model fed by several sources: each other source's input, and its frames for the gate.

A fusion model takes the frame (of the source named ``frame_source``) and,
with it, one frame of each other source, paired by capture time at runtime
(``edgescope.runtime.server.pairing``). Each other source is one graph input
named after it, with its own size and colour, declared in the manifest as an
``INPUT_ROLE_SOURCE`` binding carrying its preprocessing::

    --frame-source white --source-input nir:128x128:gray=synthetic:fluorescence

The graph's inputs are, in order: the frame, then these sources as given
(the model's ``forward`` takes them in that order). The gate runs each
source's frames alongside the frame source's, the i-th with the i-th: the
simulated sources made for this are registered (same scene, same seed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError, ExportError
from edgescope.runtime.pipeline.preprocess import input_channels, preprocess
from edgescope.runtime.pipeline.state import source_inputs
from edgescope.runtime.sources import open_source
from edgescope.v1 import manifest_pb2

Tensor = npt.NDArray[np.float32]
# One gate frame's inputs from the other sources, by input name.
SourceFrames = Mapping[str, Tensor]

_SPEC = re.compile(
    r"^(?P<name>[A-Za-z][A-Za-z0-9_-]{0,31}):(?P<height>\d+)x(?P<width>\d+):(?P<color>gray|rgb|bgr)=(?P<data>.+)$"
)
_COLORS = {
    "gray": manifest_pb2.COLOR_MODE_GRAY,
    "rgb": manifest_pb2.COLOR_MODE_RGB,
    "bgr": manifest_pb2.COLOR_MODE_BGR,
}


@dataclass(frozen=True, slots=True)
class SourceInput:
    """Another source of the model: its name (also the graph input's), input size, colour and gate data."""

    name: str
    height: int
    width: int
    color: str
    data: str

    @classmethod
    def parse(cls, text: str) -> SourceInput:
        """``NAME:HxW:COLOR=DATA``, e.g. ``nir:128x128:gray=synthetic:fluorescence``."""
        match = _SPEC.match(text.strip())
        if match is None:
            raise ConfigError(
                f"source input {text[:80]!r}: expected NAME:HxW:COLOR=DATA "
                "(e.g. nir:128x128:gray=synthetic:fluorescence; COLOR gray, rgb or bgr)"
            )
        height, width = int(match["height"]), int(match["width"])
        if height <= 0 or width <= 0:
            raise ConfigError(f"source input {match['name']}: size {height}x{width} must be positive")
        return cls(match["name"], height, width, match["color"], match["data"])


def add_source_inputs(
    manifest: manifest_pb2.ModelManifest,
    frame_source: str,
    sources: Sequence[SourceInput],
    batch: manifest_pb2.Dim,
    scale: float,
) -> None:
    """Bind the frame input to ``frame_source`` and declare each other source's input after it."""
    if not sources:
        if frame_source:
            raise ConfigError("a frame source name is for a model fed by several sources: add --source-input")
        return
    if not frame_source:
        raise ConfigError("a model fed by several sources needs the frame's source named (--frame-source)")
    names = [frame_source, *(s.name for s in sources)]
    if len(set(names)) != len(names):
        raise ConfigError(f"source names must differ: {', '.join(names)}")
    frame = manifest.inputs[0]
    manifest.input_bindings.add(input=frame.name, role=manifest_pb2.INPUT_ROLE_FRAME, source=frame_source)
    for source in sources:
        pre = manifest_pb2.Preprocessing(
            height=source.height,
            width=source.width,
            color=_COLORS[source.color],
            resize=manifest.preprocessing.resize,
            layout=manifest_pb2.LAYOUT_NCHW,
            scale=scale,
        )
        shape = [batch, *(manifest_pb2.Dim(size=d) for d in (input_channels(pre), source.height, source.width))]
        manifest.inputs.add(name=source.name, dtype=manifest_pb2.DATA_TYPE_FLOAT32, shape=shape)
        manifest.input_bindings.add(
            input=source.name, role=manifest_pb2.INPUT_ROLE_SOURCE, source=source.name, preprocessing=pre
        )


def gate_source_frames(
    manifest: manifest_pb2.ModelManifest, sources: Sequence[SourceInput], samples: int
) -> list[SourceFrames] | None:
    """The other sources' inputs for each of the gate's ``samples`` frames; None for a model of one source."""
    bindings = {b.input: b for b in source_inputs(manifest)}
    if not bindings:
        return None
    per_source: dict[str, list[Tensor]] = {}
    for source in sources:
        spec = bindings[source.name].preprocessing
        frames: list[Tensor] = []
        with open_source(source.data) as opened:
            for frame in opened:
                frames.append(preprocess(frame.pixels, spec, frame.pixel_transform)[0])
                if len(frames) == samples:
                    break
        if len(frames) < samples:
            raise ExportError(f"source {source.name}: {source.data} gave {len(frames)} frames; the gate runs {samples}")
        per_source[source.name] = frames
    return [{name: frames[i] for name, frames in per_source.items()} for i in range(samples)]
