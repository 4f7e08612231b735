"""A simulated endoscopy video, made in code (no real patient video ships with edgescope).

Mucosa-coloured tissue with vessels and folds fills a round field of view
with vignetting; the camera drifts and turns slowly over the tissue;
specular highlights glint; a metallic instrument enters from the edge and
moves. Each frame comes with the instrument's ground-truth mask, so tests
and benchmarks can check a model end to end. It is a simulation for
exercising the runtime, not data for training or judging a clinical model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError, SourceError
from edgescope.runtime.sources.base import SourceFrame, SourceKind

MIN_SIZE = 64
_CANVAS_SCALE = 1.6  # the tissue canvas is larger than the view so the camera can move over it


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> npt.NDArray[np.float32]:
    """Noise with features about ``cell`` pixels wide, in [0, 1]."""
    coarse = rng.random((max(2, height // cell), max(2, width // cell)), dtype=np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    low, high = float(field.min()), float(field.max())
    return (field - low) / max(high - low, 1e-6)


def tissue_canvas(rng: np.random.Generator, height: int, width: int) -> npt.NDArray[np.float32]:
    """RGB float tissue: pink-red mucosa, darker folds, branching vessels."""
    base = _smooth_noise(rng, height, width, max(8, width // 40))
    folds = _smooth_noise(rng, height, width, max(16, width // 8))
    shade = 0.55 + 0.45 * folds
    rgb = np.stack([200 + 45 * base, 95 + 45 * base, 85 + 35 * base], axis=-1) * shade[..., None]
    vessels = np.zeros((height, width), np.float32)
    for _ in range(max(6, width // 120)):
        point = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        heading = rng.uniform(0, 2 * math.pi)
        thickness = int(rng.integers(1, max(2, width // 400) + 2))
        for _ in range(int(rng.integers(20, 60))):
            heading += rng.normal(0, 0.35)
            step = point + 8.0 * np.array([math.cos(heading), math.sin(heading)])
            cv2.line(vessels, tuple(int(v) for v in point), tuple(int(v) for v in step), 1.0, thickness, cv2.LINE_AA)
            point = step
    vessels = np.asarray(cv2.GaussianBlur(vessels, (0, 0), 1.2), dtype=np.float32)[..., None]
    rgb = rgb * (1 - 0.45 * vessels) + np.array([120, 20, 30], np.float32) * 0.45 * vessels
    return np.asarray(rgb, dtype=np.float32)


def field_of_view(height: int, width: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
    """The round aperture (True inside) and a vignetting gain that falls towards its rim."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = min(height, width) * 0.49
    distance = np.hypot(xx - width / 2, yy - height / 2) / radius
    inside = distance <= 1.0
    gain = np.clip(1.05 - 0.55 * distance**2, 0.0, 1.0).astype(np.float32)
    return inside, gain


def _instrument(height: int, width: int, phase: float) -> npt.NDArray[np.uint8]:
    """A straight shaft from the lower right edge whose tip moves in and out."""
    angle = math.radians(215 + 10 * math.sin(phase * 0.7))
    reach = 0.25 + 0.12 * (1 + math.sin(phase)) / 2
    entry = np.array([width * 0.95, height * 0.98])
    tip = entry + np.array([math.cos(angle), math.sin(angle)]) * reach * math.hypot(width, height)
    mask = np.zeros((height, width), np.uint8)
    cv2.line(mask, tuple(int(v) for v in entry), tuple(int(v) for v in tip), 1, max(3, width // 28), cv2.LINE_AA)
    jaw = max(2, width // 60)
    cv2.circle(mask, tuple(int(v) for v in tip), jaw, 1, -1, cv2.LINE_AA)
    return mask


class SyntheticEndoscopySource:
    """Simulated endoscope video (RGB uint8), endless when ``n_frames`` is None."""

    def __init__(
        self, seed: int = 0, n_frames: int | None = None, fps: float = 30.0, height: int = 1080, width: int = 1920
    ) -> None:
        if height < MIN_SIZE or width < MIN_SIZE:
            raise ConfigError(f"endoscopy frames must be at least {MIN_SIZE}x{MIN_SIZE}, got {height}x{width}")
        if n_frames is not None and n_frames < 0:
            raise ConfigError(f"n_frames must be >= 0 or None, got {n_frames}")
        if not (math.isfinite(fps) and fps > 0):
            raise ConfigError(f"fps must be a positive number, got {fps}")
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
        for frame, _ in self.frames_with_masks():
            yield frame

    def frames_with_masks(self) -> Iterator[tuple[SourceFrame, npt.NDArray[np.uint8]]]:
        """Each frame with the instrument's mask (uint8 0/1) inside the field of view.

        Drawn from what is computed once: the tissue, aperture, vignetting, sensor noise, metal.

        Per frame only what moves is drawn: the camera's view of the tissue is
        warped at half resolution and scaled up (the tissue has no finer
        detail than that), then the instrument, glints, noise and vignetting
        go on at full resolution. 1080p renders well above 30 fps on one core.
        """
        if self._closed:
            raise SourceError("synthetic endoscopy source is closed")
        rng = np.random.default_rng(self._seed)
        height, width = self._height, self._width
        small_h, small_w = max(MIN_SIZE // 2, height // 2), max(MIN_SIZE // 2, width // 2)
        canvas = tissue_canvas(rng, int(small_h * _CANVAS_SCALE), int(small_w * _CANVAS_SCALE))
        canvas_u8 = np.clip(canvas, 0, 255).astype(np.uint8)
        inside, gain = field_of_view(height, width)
        inside_u8 = inside.astype(np.uint8)
        # Vignetting as an 8-bit gain image: zero outside the aperture blacks the corners too.
        gain_u8 = cv2.merge([np.round(gain * inside * 255).astype(np.uint8)] * 3)
        # Sensor noise from a small bank, added and subtracted with saturation (cheap at 1080p).
        bank = [np.clip(rng.normal(0, 2.0, (height, width, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
        metal = np.broadcast_to(210 - 70 * np.linspace(0, 1, width, dtype=np.float32), (height, width))
        metal_rgb = np.stack([metal, metal, metal * 1.04], axis=-1).astype(np.uint8)
        glints = [(rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.004, 0.012)) for _ in range(10)]
        index = 0
        while (self._n_frames is None or index < self._n_frames) and not self._closed:
            t = index / self._fps
            # The camera drifts over the tissue on a slow loop and turns a little.
            shift_x = (canvas_u8.shape[1] - small_w) / 2 * (1 + 0.8 * math.sin(0.31 * t))
            shift_y = (canvas_u8.shape[0] - small_h) / 2 * (1 + 0.8 * math.cos(0.23 * t))
            turn = cv2.getRotationMatrix2D((small_w / 2, small_h / 2), 4 * math.sin(0.17 * t), 1.0)
            turn[:, 2] -= (shift_x, shift_y)
            small = cv2.warpAffine(
                canvas_u8, turn, (small_w, small_h), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT,
            )  # fmt: skip
            view = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
            tool = _instrument(height, width, 1.3 * t)
            cv2.copyTo(metal_rgb, tool, view)
            for gx, gy, size in glints:
                if rng.random() < 0.85:  # glints flicker as the light moves
                    centre = (int(gx * width + 20 * math.sin(t + gx)), int(gy * height + 20 * math.cos(t + gy)))
                    cv2.circle(view, centre, max(1, int(size * width)), (255, 255, 250), -1, cv2.LINE_AA)
            view = cv2.subtract(cv2.add(view, bank[index % 3]), bank[(index + 1) % 3])
            pixels = np.asarray(cv2.multiply(view, gain_u8, scale=1.0 / 255.0), dtype=np.uint8)
            yield SourceFrame(index, pixels, t, None), np.asarray(cv2.bitwise_and(tool, inside_u8), dtype=np.uint8)
            index += 1

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> SyntheticEndoscopySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
