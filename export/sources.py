"""A model fed by several sources: each other source's input, and its frames for the gate.

A fusion model takes the frame (of the source named ``frame_source``) and,
with it, one frame of each other source, paired by capture time at runtime
(``edgescope.runtime.server.pairing``). Each other source is one graph input
named after it, with its own size and colour, declared in the manifest as an
``INPUT_ROLE_SOURCE`` binding carrying its preprocessing::

    --frame-source white --source-input nir:128x128:gray=synthetic:fluorescence

A source may instead be a 1-D signal (an ECG lead): its input is a window of
``SAMPLES`` samples of each of ``CHANNELS`` channels at ``RATE`` Hz, shaped
``[N, CHANNELS, SAMPLES]`` (``edgescope.runtime.pipeline.signal``)::

    --source-input ecg:signal:1x256@250Hz=synthetic:ecg

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

from edgescope.errors import ConfigError, ExportError, FrameError
from edgescope.runtime.pipeline.preprocess import input_channels, preprocess
from edgescope.runtime.pipeline.signal import signal_tensor
from edgescope.runtime.pipeline.state import source_inputs
from edgescope.runtime.sources import SourceFrame, open_source
from edgescope.v1 import manifest_pb2

Tensor = npt.NDArray[np.float32]
# One gate frame's inputs from the other sources, by input name.
SourceFrames = Mapping[str, Tensor]

_SPEC = re.compile(
    r"^(?P<name>[A-Za-z][A-Za-z0-9_-]{0,31}):(?P<height>\d+)x(?P<width>\d+):(?P<color>gray|rgb|bgr)=(?P<data>.+)$"
)
_NUMBER = r"\d+(?:\.\d+)?"
_SIGNAL_SPEC = re.compile(
    r"^(?P<name>[A-Za-z][A-Za-z0-9_-]{0,31}):signal:(?P<channels>\d+)x(?P<samples>\d+)"
    rf"@(?P<rate>{_NUMBER})Hz(?::(?P<units>[A-Za-z][A-Za-z0-9.\[\]]{{0,15}}))?"
    rf"(?::(?P<mean>-?{_NUMBER})/(?P<std>{_NUMBER}))?=(?P<data>.+)$"
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


@dataclass(frozen=True, slots=True)
class SignalInput:
    """Another source that is a 1-D signal: its name (also the graph input's), window, normalisation, gate data."""

    name: str
    channels: int
    samples: int
    rate_hz: float
    units: str
    mean: float
    std: float
    data: str

    @classmethod
    def parse(cls, text: str) -> SignalInput:
        """``NAME:signal:CHANNELSxSAMPLES@RATEHz[:UNITS][:MEAN/STD]=DATA`` (``ecg:signal:1x256@250Hz=synthetic:ecg``).

        Units are UCUM (mV unless given); the input is (sample - MEAN) / STD (0 and 1 unless given).
        """
        match = _SIGNAL_SPEC.match(text.strip())
        if match is None:
            raise ConfigError(
                f"signal input {text[:80]!r}: expected NAME:signal:CHANNELSxSAMPLES@RATEHz[:UNITS][:MEAN/STD]=DATA "
                "(e.g. ecg:signal:1x256@250Hz=synthetic:ecg; units mV unless given)"
            )
        channels, samples, rate = int(match["channels"]), int(match["samples"]), float(match["rate"])
        std = float(match["std"] or 1.0)
        if channels <= 0 or samples <= 0 or rate <= 0 or std <= 0:
            raise ConfigError(f"signal input {match['name']}: channels, samples, rate and std must be positive")
        mean = float(match["mean"] or 0.0)
        return cls(match["name"], channels, samples, rate, match["units"] or "mV", mean, std, match["data"])

    def spec(self) -> manifest_pb2.SignalSpec:
        return manifest_pb2.SignalSpec(
            channels=self.channels,
            samples=self.samples,
            sample_rate_hz=self.rate_hz,
            units=self.units,
            mean=self.mean,
            std=self.std,
        )


def parse_source_input(text: str) -> SourceInput | SignalInput:
    """An image source (``NAME:HxW:COLOR=DATA``) or a signal source (``NAME:signal:...=DATA``)."""
    if text.strip().partition(":")[2].startswith("signal:"):
        return SignalInput.parse(text)
    return SourceInput.parse(text)


def add_source_inputs(
    manifest: manifest_pb2.ModelManifest,
    frame_source: str,
    sources: Sequence[SourceInput | SignalInput],
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
        if isinstance(source, SignalInput):
            shape = [batch, manifest_pb2.Dim(size=source.channels), manifest_pb2.Dim(size=source.samples)]
            manifest.inputs.add(name=source.name, dtype=manifest_pb2.DATA_TYPE_FLOAT32, shape=shape)
            manifest.input_bindings.add(
                input=source.name, role=manifest_pb2.INPUT_ROLE_SOURCE, source=source.name, signal=source.spec()
            )
            continue
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
    manifest: manifest_pb2.ModelManifest, sources: Sequence[SourceInput | SignalInput], samples: int
) -> list[SourceFrames] | None:
    """The other sources' inputs for each of the gate's ``samples`` frames; None for a model of one source."""
    bindings = {b.input: b for b in source_inputs(manifest)}
    if not bindings:
        return None
    per_source: dict[str, list[Tensor]] = {}
    for source in sources:
        binding = bindings[source.name]
        frames: list[Tensor] = []
        with open_source(source.data) as opened:
            for frame in opened:
                frames.append(_gate_input(binding, frame, source.data))
                if len(frames) == samples:
                    break
        if len(frames) < samples:
            raise ExportError(f"source {source.name}: {source.data} gave {len(frames)} frames; the gate runs {samples}")
        per_source[source.name] = frames
    return [{name: frames[i] for name, frames in per_source.items()} for i in range(samples)]


def _gate_input(binding: manifest_pb2.InputBinding, frame: SourceFrame, data: str) -> Tensor:
    """One gate frame's input for a source: its window, or its preprocessed image."""
    if not binding.HasField("signal"):
        if frame.signal is not None:
            raise ExportError(f"source {binding.source}: {data} gives signal windows; this input takes images")
        return preprocess(frame.pixels, binding.preprocessing, frame.pixel_transform)[0]
    if frame.signal is None:
        raise ExportError(f"source {binding.source}: {data} gives images; this input takes a signal window")
    try:
        return signal_tensor(frame.signal, binding.signal, binding.source)
    except FrameError as exc:
        raise ExportError(f"{exc} ({data}: give it the window the model takes)") from exc
