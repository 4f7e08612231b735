"""A simulated endoscopy video, made in code (no real patient video ships with edgescope).

Mucosa-coloured tissue with vessels and folds fills a round field of view
with vignetting; the camera drifts and turns slowly over the tissue;
specular highlights glint; a metallic instrument enters from the edge and
moves. Each frame comes with the instrument's ground-truth mask, so tests
and benchmarks can check a model end to end. It is a simulation for
exercising the runtime, not data for training or judging a clinical model.

The scene is a function of the presentation time ``t`` and the seed only,
laid out on the unit square of the frame (so a frame of another size shows
the same view, scaled): a second simulated camera on the same scope, such as
``edgescope.runtime.sources.fluorescence``, shares :func:`camera_to_canvas`
and :func:`instrument_mask` and so stays registered at any frame rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError, SourceError
from edgescope.runtime.sources.base import SourceFrame, SourceKind

MIN_SIZE = 64
CANVAS_SCALE = 1.6
"""The tissue canvas is this much larger than the view, so the camera can move over it."""
_GLINT_SLOT_S = 1 / 30  # glints flicker on this clock, whatever the frame rate

ByteArray = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class EndoscopyTruth:
    """What a frame shows, as uint8 0/1 masks inside the field of view.

    ``instrument``: the metal shaft and jaw. ``glare``: specular glints, where
    the tissue is hidden by the light's reflection (white light only).
    """

    instrument: ByteArray
    glare: ByteArray


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


_SUBPIXEL_BITS = 4  # OpenCV draws at 1/16 pixel, so shapes scale with the frame without rounding jumps


def _to_pixels(points: npt.NDArray[np.float64], height: int, width: int) -> npt.NDArray[np.int32]:
    """Unit-square points (x, y) -> OpenCV fixed-point pixel coordinates (pixel centres at +0.5)."""
    pixels = points * (width, height) - 0.5
    return np.round(pixels * (1 << _SUBPIXEL_BITS)).astype(np.int32)


def camera_to_canvas(t: float, view: tuple[int, int], canvas: tuple[int, int]) -> npt.NDArray[np.float64]:
    """The 2x3 affine map from view pixels (x, y) to canvas pixels at time ``t`` (for ``WARP_INVERSE_MAP``).

    ``view`` and ``canvas`` are (height, width). The camera drifts over the
    canvas on a slow loop and turns a little; the motion is defined on the
    unit square, so views and canvases of any size see the same part of it.
    """
    view_h, view_w = view
    canvas_h, canvas_w = canvas
    turn = math.radians(4 * math.sin(0.17 * t))
    rotation = np.array([[math.cos(turn), math.sin(turn)], [-math.sin(turn), math.cos(turn)]])
    margin = (CANVAS_SCALE - 1) / 2
    offset = np.array([margin * (1 + 0.8 * math.sin(0.31 * t)), margin * (1 + 0.8 * math.cos(0.23 * t))])
    # Unit view -> unit canvas: turn about the view's centre, then shift within the canvas's margin.
    linear = rotation / CANVAS_SCALE
    shift = (0.5 - rotation @ np.array([0.5, 0.5]) + offset) / CANVAS_SCALE
    # Pixel centres: unit = (pixel + 0.5) / size on both sides.
    to_unit = np.diag([1 / view_w, 1 / view_h])
    from_unit = np.diag([float(canvas_w), float(canvas_h)])
    matrix = from_unit @ linear @ to_unit
    offset_px = from_unit @ (linear @ to_unit @ np.array([0.5, 0.5]) + shift) - 0.5
    return np.hstack([matrix, offset_px[:, None]])


def instrument_mask(height: int, width: int, t: float) -> ByteArray:
    """The instrument at time ``t``: a straight shaft from the lower right edge whose tip moves in and out."""
    phase = 1.3 * t
    angle = math.radians(215 + 10 * math.sin(phase * 0.7))
    reach = (0.25 + 0.12 * (1 + math.sin(phase)) / 2) * math.sqrt(2)
    along = np.array([math.cos(angle), math.sin(angle)])
    across = np.array([-along[1], along[0]]) / 56  # half the shaft's width
    entry = np.array([0.95, 0.98])
    tip = entry + reach * along
    mask = np.zeros((height, width), np.uint8)
    shaft = np.stack([entry + across, tip + across, tip - across, entry - across])
    cv2.fillPoly(mask, [_to_pixels(shaft, height, width)], 1, cv2.LINE_8, _SUBPIXEL_BITS)
    centre = _to_pixels(tip, height, width)
    axes = np.round(np.array([width, height]) / 60 * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.ellipse(mask, (int(centre[0]), int(centre[1])), (int(axes[0]), int(axes[1])), 0, 0, 360, 1, -1,
                cv2.LINE_8, _SUBPIXEL_BITS)  # fmt: skip
    return mask


def _lit_glints(seed: int, t: float, count: int) -> npt.NDArray[np.bool_]:
    """Which glints shine at ``t``: they flicker as the light moves, on a clock of their own."""
    slot = math.floor(t / _GLINT_SLOT_S + 1e-6)
    return np.random.default_rng([seed, 2, slot]).random(count) < 0.85


def check_settings(what: str, seed: int, n_frames: int | None, fps: float, height: int, width: int) -> None:
    """A simulated video's settings, each refused with what is wrong (``what`` names the video)."""
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ConfigError(f"{what} frames must be at least {MIN_SIZE}x{MIN_SIZE}, got {height}x{width}")
    if n_frames is not None and n_frames < 0:
        raise ConfigError(f"n_frames must be >= 0 or None, got {n_frames}")
    if not (math.isfinite(fps) and fps > 0):
        raise ConfigError(f"fps must be a positive number, got {fps}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")


class SyntheticEndoscopySource:
    """Simulated endoscope video (RGB uint8), endless when ``n_frames`` is None."""

    def __init__(
        self, seed: int = 0, n_frames: int | None = None, fps: float = 30.0, height: int = 1080, width: int = 1920
    ) -> None:
        check_settings("endoscopy", seed, n_frames, fps, height, width)
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
        for frame, _ in self.frames_with_truth():
            yield frame

    def frames_with_masks(self) -> Iterator[tuple[SourceFrame, ByteArray]]:
        """Each frame with the instrument's mask (uint8 0/1) inside the field of view."""
        for frame, truth in self.frames_with_truth():
            yield frame, truth.instrument

    def frames_with_truth(self) -> Iterator[tuple[SourceFrame, EndoscopyTruth]]:
        """Each frame with the masks of what it shows (see :class:`EndoscopyTruth`).

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
        canvas = tissue_canvas(rng, int(small_h * CANVAS_SCALE), int(small_w * CANVAS_SCALE))
        canvas_u8 = np.clip(canvas, 0, 255).astype(np.uint8)
        inside, gain = field_of_view(height, width)
        inside_u8 = inside.astype(np.uint8)
        # Vignetting as an 8-bit gain image: zero outside the aperture blacks the corners too.
        gain_u8 = cv2.merge([np.round(gain * inside * 255).astype(np.uint8)] * 3)
        # Sensor noise from a small bank, added and subtracted with saturation (cheap at 1080p).
        bank = [np.clip(rng.normal(0, 2.0, (height, width, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
        metal = np.broadcast_to(210 - 70 * np.linspace(0, 1, width, dtype=np.float32), (height, width))
        metal_rgb = np.stack([metal, metal, metal * 1.04], axis=-1).astype(np.uint8)
        # Glints from a stream of their own, so their places do not depend on the frame size.
        glint_rng = np.random.default_rng([self._seed, 1])
        glints = [(glint_rng.uniform(0.2, 0.8), glint_rng.uniform(0.2, 0.8), glint_rng.uniform(0.004, 0.012))
                  for _ in range(10)]  # fmt: skip
        index = 0
        while (self._n_frames is None or index < self._n_frames) and not self._closed:
            t = index / self._fps
            turn = camera_to_canvas(t, (small_h, small_w), canvas_u8.shape[:2])
            small = cv2.warpAffine(
                canvas_u8, turn, (small_w, small_h), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT,
            )  # fmt: skip
            view = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
            tool = instrument_mask(height, width, t)
            cv2.copyTo(metal_rgb, tool, view)
            glare = np.zeros((height, width), np.uint8)
            for (gx, gy, size), lit in zip(glints, _lit_glints(self._seed, t, len(glints)), strict=True):
                if lit:
                    centre = (int((gx + 0.01 * math.sin(t + gx)) * width), int((gy + 0.01 * math.cos(t + gy)) * height))
                    radius = max(1, int(size * width))
                    cv2.circle(view, centre, radius, (255, 255, 250), -1, cv2.LINE_AA)
                    cv2.circle(glare, centre, radius, 1, -1, cv2.LINE_AA)
            view = cv2.subtract(cv2.add(view, bank[index % 3]), bank[(index + 1) % 3])
            pixels = np.asarray(cv2.multiply(view, gain_u8, scale=1.0 / 255.0), dtype=np.uint8)
            truth = EndoscopyTruth(
                np.asarray(cv2.bitwise_and(tool, inside_u8), dtype=np.uint8),
                np.asarray(cv2.bitwise_and(glare, inside_u8), dtype=np.uint8),
            )
            yield SourceFrame(index, pixels, t, None), truth
            index += 1

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> SyntheticEndoscopySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
