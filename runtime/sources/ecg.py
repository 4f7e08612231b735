"""A simulated ECG lead, made in code (no real recording ships with edgescope).

Each beat is the sum of five Gaussian waves (P, Q, R, S, T) at their usual
times around the R peak, the T wave later and wider at slower rates (as the
QT interval lengthens with the RR interval), over a slow respiratory baseline
wander and a little mains hum. The heart rate is ``bpm`` and the seed moves
the beats' phase. The signal is a function of time, so it is the same
whatever the frame rate or window: each frame is the window of the last
``window`` samples at ``rate_hz``, ending at the newest sample at or before
the frame's presentation time, and is stamped with that sample's time.

The frames keep the time base of the simulated imaging sources (frame ``k``
at ``k / fps`` from the start), so streamed with ``synthetic:ultrasound`` or
``synthetic:endoscopy`` a window pairs with the image taken at its end. It is
a simulation for exercising the runtime and signal inputs, not data for
training or judging a clinical model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError
from edgescope.runtime.pipeline.signal import window_of
from edgescope.runtime.sources.base import SourceFrame, SourceKind

UNITS = "mV"

# (time from the R peak in s at 60 bpm, amplitude in mV, width in s) of the P, Q, R, S and T waves.
_WAVES = (
    (-0.20, 0.15, 0.025),
    (-0.05, -0.15, 0.010),
    (0.00, 1.20, 0.012),
    (0.05, -0.25, 0.010),
    (0.30, 0.35, 0.050),
)
_WANDER_MV, _WANDER_HZ = 0.05, 0.25
_HUM_MV, _HUM_HZ = 0.01, 50.0
_NO_PIXELS = np.zeros((0, 0), np.uint8)


def ecg(times_s: npt.NDArray[np.float64], bpm: float, seed: int = 0) -> npt.NDArray[np.float64]:
    """The simulated lead in mV at ``times_s`` (any times: the signal is defined before 0 too)."""
    period = 60.0 / bpm
    phase = np.random.default_rng([seed, 11]).uniform(0, period)
    stretch = math.sqrt(period)  # Bazett: the T wave's delay and width scale with sqrt(RR)
    values = _WANDER_MV * np.sin(2 * math.pi * _WANDER_HZ * times_s) + _HUM_MV * np.sin(2 * math.pi * _HUM_HZ * times_s)
    for index, (offset, amplitude, width) in enumerate(_WAVES):
        scale = stretch if index == len(_WAVES) - 1 else 1.0
        # Distance to the nearest beat's wave centre, so every beat contributes without a loop over beats.
        distance = np.mod(times_s - phase - offset * scale + period / 2, period) - period / 2
        values += amplitude * np.exp(-0.5 * (distance / (width * scale)) ** 2)
    return values


class SyntheticEcgSource:
    """Simulated single-lead ECG windows at ``fps`` windows a second, endless when ``n_frames`` is None."""

    def __init__(
        self,
        seed: int = 0,
        n_frames: int | None = None,
        fps: float = 30.0,
        bpm: float = 72.0,
        rate_hz: float = 250.0,
        window: int = 256,
    ) -> None:
        if n_frames is not None and n_frames < 0:
            raise ConfigError(f"n_frames must be >= 0 or None, got {n_frames}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        for name, value, low, high in (("fps", fps, 0.0, 1000.0), ("bpm", bpm, 20.0, 300.0)):
            if not (math.isfinite(value) and low < value <= high):
                raise ConfigError(f"{name} must be a number in ({low:g}, {high:g}], got {value}")
        if not (math.isfinite(rate_hz) and 1.0 <= rate_hz <= 10_000.0):
            raise ConfigError(f"rate must be 1 to 10000 Hz, got {rate_hz}")
        if not 1 <= window <= 65_536:
            raise ConfigError(f"window must be 1 to 65536 samples, got {window}")
        self._seed, self._n_frames, self._fps = seed, n_frames, float(fps)
        self._bpm, self._rate, self._window = float(bpm), float(rate_hz), window
        self._closed = False

    @property
    def kind(self) -> SourceKind:
        return "other"

    @property
    def fps(self) -> float:
        return self._fps

    def window_at(self, index: int) -> tuple[float, npt.NDArray[np.float64]]:
        """Frame ``index``'s window (1 x window samples, mV) and the time of its last sample."""
        last = math.floor(index / self._fps * self._rate + 1e-9)
        times = (np.arange(last - self._window + 1, last + 1, dtype=np.float64)) / self._rate
        return last / self._rate, ecg(times, self._bpm, self._seed)[None, :]

    def __iter__(self) -> Iterator[SourceFrame]:
        index = 0
        while (self._n_frames is None or index < self._n_frames) and not self._closed:
            end_s, samples = self.window_at(index)
            signal = window_of(samples, self._rate, UNITS)
            yield SourceFrame(index=index, pixels=_NO_PIXELS, timestamp_s=end_s, spacing_mm=None, signal=signal)
            index += 1

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> SyntheticEcgSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
