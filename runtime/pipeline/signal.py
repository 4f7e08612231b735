"""A window of a 1-D signal (an ECG lead) as a model input.

A model fed by several sources may take one of them as a sampled signal
rather than images: its manifest binds that source with a ``SignalSpec``
(channels, samples per window, sample rate, units, normalisation), and each
frame of the source carries one ``SignalWindow`` (``Frame.signal``): the last
``samples`` samples of every channel, float32 little-endian, channel after
channel, its ``capture_time_ns`` the time of the last sample. The input is
``[1, channels, samples]``, each sample ``(value - mean) / std``.

A window that does not match the spec is refused as it is read
(``signal_refusal``), so the error is that frame's alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from edgescope.errors import FrameError
from edgescope.runtime.pipeline.state import source_inputs
from edgescope.v1 import manifest_pb2, stream_pb2

Tensor = npt.NDArray[np.float32]

# Two devices' nominal rates may differ in their last digits; a window at another rate
# than the model was made for is another signal (its heart rate would read wrong).
_RATE_TOLERANCE = 1e-3
_SAMPLE = np.dtype("<f4")


def signal_specs(manifest: manifest_pb2.ModelManifest) -> dict[str, manifest_pb2.SignalSpec]:
    """The model's signal sources, by source name."""
    return {b.source: b.signal for b in source_inputs(manifest) if b.HasField("signal")}


def window_of(samples: npt.ArrayLike, sample_rate_hz: float, units: str = "") -> stream_pb2.SignalWindow:
    """A window from ``samples`` shaped (channels, samples)."""
    values = np.ascontiguousarray(samples, dtype=_SAMPLE)
    if values.ndim != 2:
        raise ValueError(f"a signal window is (channels, samples), got shape {values.shape}")
    channels, count = values.shape
    return stream_pb2.SignalWindow(
        channels=channels, samples=count, sample_rate_hz=sample_rate_hz, data=values.tobytes(), units=units
    )


def check_window(window: stream_pb2.SignalWindow, spec: manifest_pb2.SignalSpec, source: str) -> None:
    """Refuse a window that is not the one the model takes, saying what differs."""
    expected = f"{spec.channels} channel(s) x {spec.samples} samples at {spec.sample_rate_hz:g} Hz"
    if window.channels != spec.channels or window.samples != spec.samples:
        raise FrameError(
            f"source {source!r}: the window has {window.channels} channel(s) x {window.samples} samples; "
            f"the model takes {expected}"
        )
    rate = window.sample_rate_hz
    if not (math.isfinite(rate) and abs(rate - spec.sample_rate_hz) <= _RATE_TOLERANCE * spec.sample_rate_hz):
        raise FrameError(f"source {source!r}: the window is sampled at {rate:g} Hz; the model takes {expected}")
    if window.units and window.units != spec.units:
        shown = window.units[:32]  # the client's string, echoed into the answer: bounded
        raise FrameError(f"source {source!r}: the window is in {shown!r}; the model takes {spec.units!r}")
    size = spec.channels * spec.samples * _SAMPLE.itemsize
    if len(window.data) != size:
        raise FrameError(
            f"source {source!r}: the window has {len(window.data)} bytes of samples; "
            f"{expected} is {size} (float32 little-endian)"
        )
    if not np.isfinite(np.frombuffer(window.data, dtype=_SAMPLE)).all():
        raise FrameError(f"source {source!r}: the window has samples that are not finite numbers")


def signal_tensor(window: stream_pb2.SignalWindow, spec: manifest_pb2.SignalSpec, source: str) -> Tensor:
    """The model's input for one window: [1, channels, samples], normalised."""
    check_window(window, spec, source)
    values = np.frombuffer(window.data, dtype=_SAMPLE).reshape(1, spec.channels, spec.samples)
    std = spec.std or 1.0
    return ((values - spec.mean) / std).astype(np.float32)


def signal_refusal(frame: stream_pb2.Frame, specs: Mapping[str, manifest_pb2.SignalSpec]) -> FrameError | None:
    """Why a frame of a stream of several sources carries the wrong payload for its source, if it does."""
    spec = specs.get(frame.source)
    carries_signal = frame.WhichOneof("pixels") == "signal"
    if spec is None:
        return FrameError(f"source {frame.source!r} takes images, not a signal window") if carries_signal else None
    if not carries_signal:
        return FrameError(f"source {frame.source!r} is a signal: its frames carry a window (Frame.signal)")
    try:
        check_window(frame.signal, spec, frame.source)
    except FrameError as exc:
        return exc
    return None


def spec_problems(source: str, spec: manifest_pb2.SignalSpec) -> list[str]:
    """What is wrong with a manifest's signal spec (for the manifest check)."""
    problems = []
    if spec.channels <= 0 or spec.samples <= 0:
        problems.append(f"signal source {source!r} takes {spec.channels} channel(s) x {spec.samples} samples")
    if not (math.isfinite(spec.sample_rate_hz) and spec.sample_rate_hz > 0):
        problems.append(f"signal source {source!r} has sample rate {spec.sample_rate_hz}")
    if not (math.isfinite(spec.mean) and math.isfinite(spec.std) and spec.std >= 0):
        problems.append(f"signal source {source!r} has normalisation mean {spec.mean}, std {spec.std}")
    return problems
