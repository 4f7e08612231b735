"""A simulated near-infrared (NIR) ICG fluorescence video, made in code (no real one ships with edgescope).

The NIR camera of a fluorescence endoscope sees the same scene as its
white-light camera (``edgescope.runtime.sources.endoscopy``): for the same
seed, a frame presented at time ``t`` shows the tissue where the white-light
frame at ``t`` shows it, whatever the two frame rates (same geometry at the
same size; at another size, the same view scaled). What it shows differs:

- tissue perfused with ICG glows, diffusely (the light scatters in tissue),
  with the heartbeat, over a dark background with a faint autofluorescence;
  in white light the perfused tissue looks like the rest;
- vessels, folds and specular glints are white-light only (the emission
  filter blocks the reflected light); the instrument hides the glow behind
  it and shows as a faint grey (leaked excitation light off the metal);
- sensor noise (shot and read noise) and a little vignetting.

Each frame comes with its ground-truth mask of perfused tissue
(:meth:`SyntheticFluorescenceSource.frames_with_masks`, or
:class:`PerfusionMasks` at any time and size). It is a simulation
for exercising the runtime and the example fusion model, not data for
training or judging a clinical model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError, SourceError
from edgescope.runtime.sources.base import SourceFrame, SourceKind
from edgescope.runtime.sources.endoscopy import (
    CANVAS_SCALE,
    ByteArray,
    camera_to_canvas,
    check_settings,
    field_of_view,
    instrument_mask,
)

FloatArray = npt.NDArray[np.float32]

_SCATTER = 0.02
"""Blur of the glow by tissue scattering: Gaussian sigma as a share of the frame's shorter side."""
_INSTRUMENT_LEAK = 0.05
"""Brightness of the instrument in NIR (reflected excitation light that leaks through the filter)."""
_HEART_HZ = 1.2
_BLACK_LEVEL = 6.0


def _regions(seed: int) -> list[tuple[npt.NDArray[np.float64], float]]:
    """The perfused regions: each one's outline (points on the unit-square canvas) and ICG brightness.

    Each region is a lobed blob; drawn from a stream of the seed's own, so
    the regions do not depend on the frame size or on the white-light camera.
    """
    rng = np.random.default_rng([seed, 3])
    angles = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    regions = []
    for _ in range(int(rng.integers(3, 6))):
        centre = rng.uniform(0.15, 0.85, 2)
        radius = np.full_like(angles, rng.uniform(0.07, 0.15))
        for lobe in range(2, 6):
            radius *= 1 + rng.uniform(0, 0.3 / lobe) * np.cos(lobe * angles + rng.uniform(0, 2 * math.pi))
        outline = centre + radius[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        regions.append((outline, float(rng.uniform(0.45, 1.0))))
    return regions


def _fill(outline: npt.NDArray[np.float64], height: int, width: int) -> ByteArray:
    """One region on a canvas of ``height`` x ``width`` (0..255, antialiased), at 1/16 pixel precision."""
    points = np.round((outline * (width, height) - 0.5) * 16).astype(np.int32)
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [points], 255, cv2.LINE_AA, 4)
    return canvas


def _mask_canvas(seed: int, height: int, width: int) -> ByteArray:
    """Where the perfused regions are (0/255) on a canvas of ``height`` x ``width``."""
    mask = np.zeros((height, width), np.uint8)
    for outline, _ in _regions(seed):
        mask = np.maximum(mask, _fill(outline, height, width))
    return np.where(mask >= 128, 255, 0).astype(np.uint8)


def _smooth(rng: np.random.Generator, height: int, width: int) -> FloatArray:
    """Smooth variation in [0, 1] from a fixed coarse grid, so any canvas size gets the same pattern."""
    coarse = rng.random((12, 12), dtype=np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.asarray(np.clip(field, 0, 1), dtype=np.float32)


def _glow_canvas(seed: int, height: int, width: int) -> FloatArray:
    """The fluorescence (0..1) before scattering, on a canvas of ``height`` x ``width``."""
    glow = np.zeros((height, width), np.float32)
    for outline, brightness in _regions(seed):
        glow = np.maximum(glow, _fill(outline, height, width).astype(np.float32) * np.float32(brightness / 255))
    rng = np.random.default_rng([seed, 4])
    # Perfusion is uneven inside a region; tissue autofluoresces a little everywhere.
    glow = glow * (0.55 + 0.45 * _smooth(rng, height, width)) + 0.05 * _smooth(rng, height, width)
    return np.asarray(glow, dtype=np.float32)


class PerfusionMasks:
    """The ground truth of the seed's scene at any time, at ``height`` x ``width``.

    :meth:`at` gives the perfused tissue in view: tissue with ICG, inside the
    field of view and not behind the instrument (uint8 0/1). The masks are
    drawn from the scene, not resized from a frame, so they are as sharp at
    the white-light frame's size as at the NIR frame's.
    """

    def __init__(self, seed: int, height: int, width: int) -> None:
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if height < 1 or width < 1:
            raise ConfigError(f"mask size must be positive, got {height}x{width}")
        self._height, self._width = height, width
        self._canvas = _mask_canvas(seed, int(height * CANVAS_SCALE), int(width * CANVAS_SCALE))
        self._inside = field_of_view(height, width)[0]

    def at(self, t: float) -> ByteArray:
        """The mask at presentation time ``t`` (seconds)."""
        turn = camera_to_canvas(t, (self._height, self._width), self._canvas.shape[:2])
        seen = cv2.warpAffine(
            self._canvas, turn, (self._width, self._height), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT,
        )  # fmt: skip
        truth = (seen >= 128) & self._inside & (instrument_mask(self._height, self._width, t) == 0)
        return np.asarray(truth, dtype=np.uint8)


class SyntheticFluorescenceSource:
    """Simulated NIR fluorescence video (gray uint8), registered to the synthetic endoscope of the same seed.

    Endless when ``n_frames`` is None.
    """

    def __init__(
        self, seed: int = 0, n_frames: int | None = None, fps: float = 25.0, height: int = 1080, width: int = 1920
    ) -> None:
        check_settings("fluorescence", seed, n_frames, fps, height, width)
        self._seed, self._n_frames, self._fps = seed, n_frames, float(fps)
        self._height, self._width = height, width
        self._closed = False

    @property
    def kind(self) -> SourceKind:
        return "endoscopy"

    @property
    def fps(self) -> float:
        return self._fps

    def __iter__(self) -> Iterator[SourceFrame]:
        """The frames; drawn from what is computed once (the glow canvas, aperture, vignetting, a noise bank).

        The glow has no detail finer than its scattering, so it is warped,
        scattered and shaded at up to a quarter of the resolution and scaled
        up; the instrument and the noise go on at full resolution.
        """
        if self._closed:
            raise SourceError("synthetic fluorescence source is closed")
        height, width = self._height, self._width
        scatter = _SCATTER * min(height, width)
        step = max(1, min(4, int(scatter / 2)))  # keeps the blur at least 2 pixels wide where it runs
        small_h, small_w = height // step, width // step
        canvas = _glow_canvas(self._seed, int(small_h * CANVAS_SCALE), int(small_w * CANVAS_SCALE))
        _, vignetting = field_of_view(small_h, small_w)
        gain = ((0.65 + 0.35 * vignetting) * 235).astype(np.float32)  # grey levels per unit of glow
        inside, _ = field_of_view(height, width)
        inside_u8 = inside.astype(np.uint8)
        leak = np.full((height, width), _INSTRUMENT_LEAK * 235, np.float32)
        rng = np.random.default_rng([self._seed, 5])
        bank = [rng.standard_normal((height, width), dtype=np.float32) for _ in range(3)]
        index = 0
        while (self._n_frames is None or index < self._n_frames) and not self._closed:
            t = index / self._fps
            turn = camera_to_canvas(t, (small_h, small_w), canvas.shape[:2])
            small = cv2.warpAffine(
                canvas, turn, (small_w, small_h), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT,
            )  # fmt: skip
            small = cv2.GaussianBlur(small, (0, 0), scatter / step)
            small = cv2.multiply(small, gain, scale=1 + 0.04 * math.sin(2 * math.pi * _HEART_HZ * t))
            signal = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
            cv2.copyTo(leak, instrument_mask(height, width, t), signal)
            # Shot noise grows with the signal (in grey levels), read noise does not; a small black
            # level keeps the noise around black from being clipped to a bias.
            spread = cv2.sqrt(cv2.addWeighted(signal, 0.6, signal, 0.0, 4.0))
            signal = cv2.add(signal, cv2.multiply(spread, bank[index % 3]))
            pixels = cv2.multiply(cv2.convertScaleAbs(signal, alpha=1.0, beta=_BLACK_LEVEL), inside_u8)
            yield SourceFrame(index, np.asarray(pixels, dtype=np.uint8), t, None)
            index += 1

    def frames_with_masks(self, mask_size: tuple[int, int] | None = None) -> Iterator[tuple[SourceFrame, ByteArray]]:
        """Each frame with its ground truth, :meth:`PerfusionMasks.at` its time.

        ``mask_size`` (height, width) draws the masks at another size (for
        example the white-light frame's); by default they are the frame's.
        """
        masks = PerfusionMasks(self._seed, *(mask_size or (self._height, self._width)))
        for frame in self:
            yield frame, masks.at(frame.timestamp_s)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> SyntheticFluorescenceSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
