"""A simulated B-mode ultrasound cine, generated in code.

Everything here is a simulation: no patient data is read or reproduced. The
frames exist so that the runtime, its tests, its benchmarks and the example
model have a realistic-looking live source with known ground truth on any
machine.

The model, in the order it is applied:

* a curvilinear probe's fan (sector) field of view, apex at the top centre,
  black outside;
* tissue echogenicity in dB: layers that follow the probe's arc (skin, fat,
  fascia lines, muscle), a smooth texture, and 0-3 elliptical lesions that are
  hypoechoic (darker) or hyperechoic (brighter) with soft boundaries;
* fully developed speckle: the magnitude of a complex Gaussian field (Rayleigh
  distributed), correlated over a resolution cell that is wider laterally than
  axially, drawn on the beam grid and scan-converted to pixels;
* round-trip attenuation with depth, additive electronic noise, and
  time-gain compensation (TGC) that amplifies both;
* log compression to the display's dynamic range.

``SyntheticUltrasoundSource`` plays a cine: the tissue stays, lesions drift
slowly, and the speckle is drawn anew for every frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np
import numpy.typing as npt

from edgescope.errors import ConfigError, SourceError
from edgescope.runtime.sources.base import SourceFrame, SourceKind

__all__ = [
    "FanGeometry",
    "Lesion",
    "Scene",
    "SyntheticUltrasoundSource",
    "fan_geometry",
    "fan_mask",
    "random_scene",
    "render",
    "simulate_ultrasound",
]

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]

MIN_SIZE = 64
"""Smallest frame side the simulator accepts; below it the fan degenerates."""

# Beam grid on which speckle is drawn. Enough beams that the lateral speckle
# size at the bottom of the fan is a few pixels, as on a real scanner.
_BEAMS = 256
# Speckle cell (Gaussian sigma) on the beam grid: axial in depth samples,
# lateral in beams. Lateral > axial gives the elongated look of real speckle.
_SPECKLE_SIGMA_AXIAL = 0.8
_SPECKLE_SIGMA_LATERAL = 1.3
# Round-trip attenuation over the full depth, in dB (about 3.5 MHz in soft
# tissue over 14 cm), and the electronic noise level relative to 0 dB tissue.
_ATTENUATION_DB = 50.0
_NOISE_DB = -62.0


@dataclass(frozen=True, slots=True)
class FanGeometry:
    """Where the sector lies in a frame, in pixels and radians.

    The apex is a virtual point at ``apex`` (row, column); the image spans
    radii ``r_min`` (the probe face) to ``r_max`` and angles within
    ``half_angle`` of straight down.
    """

    height: int
    width: int
    apex: tuple[float, float]
    r_min: float
    r_max: float
    half_angle: float


@dataclass(frozen=True, slots=True)
class Lesion:
    """An elliptical lesion in pixel coordinates.

    ``center`` is (row, column), ``axes`` the semi-axes before rotation by
    ``angle`` (radians, counter-clockwise from the column axis).
    ``contrast_db`` is the echogenicity relative to the tissue around it:
    negative is hypoechoic, positive hyperechoic. ``edge_px`` is the width of
    the soft boundary.
    """

    center: tuple[float, float]
    axes: tuple[float, float]
    angle: float
    contrast_db: float
    edge_px: float = 2.0

    @property
    def hypoechoic(self) -> bool:
        return self.contrast_db < 0.0


@dataclass(frozen=True, slots=True)
class Scene:
    """What is imaged: static tissue (dB, per pixel) and the lesions in it."""

    geometry: FanGeometry
    tissue_db: FloatArray
    lesions: tuple[Lesion, ...]
    dynamic_range_db: float = 55.0


@dataclass(frozen=True, slots=True)
class _Grid:
    """Per-pixel polar coordinates and scan-conversion maps for one geometry."""

    radius: FloatArray
    theta: FloatArray
    inside: BoolArray
    depth_samples: int
    map1: npt.NDArray[np.int16]
    map2: npt.NDArray[np.uint16]


def fan_geometry(height: int, width: int) -> FanGeometry:
    """The sector used for frames of this size."""
    _check_size(height, width)
    r_max = 0.97 * height
    # Widest sector that still fits the frame, at most 38 degrees each side.
    half_angle = min(math.radians(38.0), math.asin(min(1.0, (width / 2 - 2) / r_max)))
    return FanGeometry(
        height=height,
        width=width,
        apex=(0.0, (width - 1) / 2),
        r_min=0.08 * height,
        r_max=r_max,
        half_angle=half_angle,
    )


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> _Grid:
    # Computed once per frame size: every frame of a cine reuses it.
    geo = fan_geometry(height, width)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    dy = rows - np.float32(geo.apex[0])
    dx = cols - np.float32(geo.apex[1])
    radius = np.hypot(dx, dy).astype(np.float32)
    theta = np.arctan2(dx, dy).astype(np.float32)
    inside = (radius >= geo.r_min) & (radius <= geo.r_max) & (np.abs(theta) <= geo.half_angle)
    depth_samples = math.ceil(geo.r_max - geo.r_min) + 1
    map_r = (radius - np.float32(geo.r_min)).astype(np.float32)
    map_b = ((theta + np.float32(geo.half_angle)) * np.float32((_BEAMS - 1) / (2 * geo.half_angle))).astype(np.float32)
    # Fixed-point maps are faster for cv2.remap than float maps.
    map1, map2 = cv2.convertMaps(map_b, map_r, cv2.CV_16SC2)
    # Shared by every caller through the cache: make accidental writes fail.
    for array in (radius, theta, inside):
        array.setflags(write=False)
    return _Grid(
        radius=radius,
        theta=theta,
        inside=inside,
        depth_samples=depth_samples,
        map1=np.asarray(map1, dtype=np.int16),
        map2=np.asarray(map2, dtype=np.uint16),
    )


def fan_mask(height: int, width: int) -> BoolArray:
    """True for pixels inside the field of view of a ``height`` x ``width`` frame."""
    inside: BoolArray = _grid(height, width).inside.copy()
    return inside


def _check_size(height: int, width: int) -> None:
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ConfigError(f"frame size must be at least {MIN_SIZE}x{MIN_SIZE}, got {height}x{width}")


def _tissue_db(rng: np.random.Generator, geo: FanGeometry) -> FloatArray:
    """Layered tissue in dB relative to the reference (muscle) level."""
    grid = _grid(geo.height, geo.width)
    depth = (grid.radius - np.float32(geo.r_min)) / np.float32(geo.r_max - geo.r_min)
    theta = grid.theta
    tissue = np.zeros_like(depth)

    def boundary(mean_depth: float) -> FloatArray:
        # Layers follow the probe's arc with a gentle undulation.
        amplitude = rng.uniform(0.005, 0.02)
        frequency = rng.uniform(1.5, 5.0)
        phase = rng.uniform(0.0, 2 * math.pi)
        wave: FloatArray = np.sin(theta * np.float32(frequency) + np.float32(phase))
        depth: FloatArray = np.float32(mean_depth) + np.float32(amplitude) * wave
        return depth

    def step(edge: FloatArray, delta_db: float, softness: float) -> None:
        tissue[...] += delta_db / (1.0 + np.exp(-(depth - edge) / softness))

    def line(edge: FloatArray, peak_db: float, thickness: float) -> None:
        tissue[...] += peak_db * np.exp(-(((depth - edge) / thickness) ** 2))

    skin = boundary(rng.uniform(0.03, 0.05))
    fat = boundary(rng.uniform(0.10, 0.16))
    deep = boundary(rng.uniform(0.45, 0.65))
    tissue += rng.uniform(3.0, 6.0)  # skin: bright
    step(skin, -rng.uniform(6.0, 9.0), 0.004)  # subcutaneous fat: darker
    step(fat, rng.uniform(2.0, 4.0), 0.004)  # muscle: the 0 dB reference, roughly
    line(fat, rng.uniform(6.0, 10.0), 0.006)  # fascia between fat and muscle
    line(deep, rng.uniform(3.0, 7.0), 0.008)  # a deeper fascial plane
    step(deep, rng.uniform(-2.0, 2.0), 0.01)  # deeper tissue, slightly different

    # Smooth texture: coarse noise upsampled, a few dB of slow variation.
    coarse = rng.standard_normal((6, 8)).astype(np.float32)
    texture = cv2.resize(coarse, (geo.width, geo.height), interpolation=cv2.INTER_CUBIC)
    tissue += np.float32(rng.uniform(1.0, 2.5)) * np.asarray(texture, dtype=np.float32)
    result: FloatArray = tissue.astype(np.float32)
    return result


def _random_lesion(rng: np.random.Generator, geo: FanGeometry, placed: list[Lesion]) -> Lesion | None:
    for _ in range(20):
        a = rng.uniform(0.04, 0.11) * geo.height
        b = a * rng.uniform(0.55, 1.0)
        center = _random_center(rng, geo)
        # Lesions may touch but should not swallow each other.
        if all(math.dist(center, other.center) > 0.8 * (a + other.axes[0]) for other in placed):
            hypo = rng.random() < 0.6
            contrast = -rng.uniform(6.0, 20.0) if hypo else rng.uniform(6.0, 12.0)
            return Lesion(
                center=center,
                axes=(float(a), float(b)),
                angle=float(rng.uniform(0.0, math.pi)),
                contrast_db=float(contrast),
                edge_px=float(rng.uniform(1.5, 4.0)),
            )
    return None


def _lesion_region(geo: FanGeometry) -> tuple[float, float, float]:
    """Radii and half angle within which lesion centres stay."""
    span = geo.r_max - geo.r_min
    return geo.r_min + 0.25 * span, geo.r_max - 0.15 * span, 0.7 * geo.half_angle


def _random_center(rng: np.random.Generator, geo: FanGeometry) -> tuple[float, float]:
    r_lo, r_hi, half = _lesion_region(geo)
    r = rng.uniform(r_lo, r_hi)
    t = rng.uniform(-half, half)
    return geo.apex[0] + r * math.cos(t), geo.apex[1] + r * math.sin(t)


def random_scene(rng: np.random.Generator, height: int = 480, width: int = 640, max_lesions: int = 3) -> Scene:
    """A random tissue with 0 to ``max_lesions`` lesions, uniformly many."""
    geo = fan_geometry(height, width)
    lesions: list[Lesion] = []
    for _ in range(int(rng.integers(0, max_lesions + 1))):
        lesion = _random_lesion(rng, geo, lesions)
        if lesion is not None:
            lesions.append(lesion)
    return Scene(
        geometry=geo,
        tissue_db=_tissue_db(rng, geo),
        lesions=tuple(lesions),
        dynamic_range_db=float(rng.uniform(50.0, 60.0)),
    )


def _paint_lesion(lesion: Lesion, echo_db: FloatArray, mask: ByteArray) -> None:
    """Add one lesion's contrast to ``echo_db`` and mark its inside in ``mask``."""
    height, width = echo_db.shape
    reach = max(lesion.axes) + 4 * lesion.edge_px
    r0 = max(0, int(lesion.center[0] - reach))
    r1 = min(height, int(lesion.center[0] + reach) + 1)
    c0 = max(0, int(lesion.center[1] - reach))
    c1 = min(width, int(lesion.center[1] + reach) + 1)
    if r0 >= r1 or c0 >= c1:
        return
    # Only the lesion's bounding box is touched: cheap for small lesions.
    ys, xs = np.ogrid[r0:r1, c0:c1]
    dy = (ys - lesion.center[0]).astype(np.float32)
    dx = (xs - lesion.center[1]).astype(np.float32)
    cos_a, sin_a = math.cos(lesion.angle), math.sin(lesion.angle)
    u = (dx * cos_a - dy * sin_a) / lesion.axes[0]
    v = (dx * sin_a + dy * cos_a) / lesion.axes[1]
    rho = np.sqrt(u * u + v * v)
    # Signed distance to the boundary, approximately in pixels (<0 inside).
    signed = (rho - 1.0) * min(lesion.axes)
    weight = 1.0 / (1.0 + np.exp(signed / lesion.edge_px))
    echo_db[r0:r1, c0:c1] += (lesion.contrast_db * weight).astype(np.float32)
    mask[r0:r1, c0:c1] |= (rho <= 1.0).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator) -> tuple[ByteArray, ByteArray]:
    """One B-mode frame of ``scene`` with fresh speckle and noise from ``rng``.

    Returns ``(image, mask)``: the uint8 ``(H, W)`` image, black outside the
    fan, and the uint8 0/1 lesion mask restricted to the fan.
    """
    geo = scene.geometry
    grid = _grid(geo.height, geo.width)
    echo_db = scene.tissue_db.copy()
    mask = np.zeros((geo.height, geo.width), dtype=np.uint8)
    for lesion in scene.lesions:
        _paint_lesion(lesion, echo_db, mask)
    mask &= grid.inside.astype(np.uint8)

    # Complex Gaussian scatter on the beam grid: channels 0-1 smoothed over a
    # resolution cell become speckle, channels 2-3 stay white as noise.
    field = rng.standard_normal((grid.depth_samples, _BEAMS, 4), dtype=np.float32)
    cell = cv2.GaussianBlur(
        field[:, :, :2],
        (0, 0),
        sigmaX=_SPECKLE_SIGMA_LATERAL,
        sigmaY=_SPECKLE_SIGMA_AXIAL,
    )
    polar = np.empty((grid.depth_samples, _BEAMS, 2), dtype=np.float32)
    # Normalise so that E[speckle^2] = 1 whatever the cell size.
    gain = np.float32(
        1.0 / math.sqrt(2.0 * _gaussian_energy(_SPECKLE_SIGMA_LATERAL) * _gaussian_energy(_SPECKLE_SIGMA_AXIAL))
    )
    polar[:, :, 0] = np.hypot(cell[:, :, 0], cell[:, :, 1]) * gain
    polar[:, :, 1] = np.hypot(field[:, :, 2], field[:, :, 3]) * np.float32(math.sqrt(0.5))
    cart = np.asarray(
        cv2.remap(
            polar,
            grid.map1,
            grid.map2,
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        ),
        dtype=np.float32,
    )
    speckle = cart[:, :, 0]
    noise = cart[:, :, 1]

    depth = (grid.radius - np.float32(geo.r_min)) * np.float32(1.0 / (geo.r_max - geo.r_min))
    attenuation_db = np.float32(_ATTENUATION_DB) * depth
    # TGC undoes most of the attenuation; it amplifies the noise with it.
    tgc_db = np.float32(0.9 * _ATTENUATION_DB) * depth
    amplitude = np.power(np.float32(10.0), (echo_db - attenuation_db) * np.float32(1 / 20)) * speckle
    amplitude += np.float32(10.0 ** (_NOISE_DB / 20)) * noise
    shown_db = np.float32(20.0) * np.log10(amplitude + np.float32(1e-6)) + tgc_db

    # 0 dB tissue lands a little below mid-grey, as with a typical gain.
    dr = np.float32(scene.dynamic_range_db)
    gray = (shown_db + np.float32(0.45) * dr) * (np.float32(255.0) / dr)
    image = np.clip(gray, 0.0, 255.0).astype(np.uint8)
    image[~grid.inside] = 0
    return image, mask


@lru_cache(maxsize=4)
def _gaussian_energy(sigma: float) -> float:
    """Sum of squares of the 1-D kernel cv2.GaussianBlur uses for ``sigma``."""
    size = 2 * math.ceil(4 * sigma) + 1 if sigma > 0 else 1
    kernel = cv2.getGaussianKernel(size, sigma, cv2.CV_64F)
    return float(np.sum(np.square(kernel)))


def simulate_ultrasound(
    rng: np.random.Generator, height: int = 480, width: int = 640, max_lesions: int = 3
) -> tuple[ByteArray, ByteArray]:
    """One independent simulated B-mode image and its lesion mask.

    Returns ``(image, mask)``, both uint8 ``(height, width)``; the mask is 0/1
    and marks lesion pixels inside the fan. Same generator state, same image.
    """
    return render(random_scene(rng, height, width, max_lesions), rng)


class SyntheticUltrasoundSource:
    """A simulated ultrasound cine: endless when ``n_frames`` is None.

    Each iteration replays the same cine from ``seed``. Lesions drift by about
    a pixel per frame or less; speckle is new in every frame.
    """

    def __init__(
        self,
        seed: int = 0,
        n_frames: int | None = None,
        fps: float = 30.0,
        height: int = 480,
        width: int = 640,
        spacing_mm: tuple[float, float] = (0.3, 0.3),
    ) -> None:
        _check_size(height, width)
        if n_frames is not None and n_frames < 0:
            raise ConfigError(f"n_frames must be >= 0 or None, got {n_frames}")
        if not (math.isfinite(fps) and fps > 0):
            raise ConfigError(f"fps must be a positive number, got {fps}")
        self._seed = seed
        self._n_frames = n_frames
        self._fps = float(fps)
        self._height = height
        self._width = width
        self._spacing_mm = spacing_mm
        self._closed = False

    @property
    def kind(self) -> SourceKind:
        return "ultrasound"

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def n_frames(self) -> int | None:
        return self._n_frames

    def __iter__(self) -> Iterator[SourceFrame]:
        for frame, _ in self.frames_with_masks():
            yield frame

    def frames_with_masks(self) -> Iterator[tuple[SourceFrame, ByteArray]]:
        """The cine's frames, each with its ground-truth lesion mask (uint8 0/1)."""
        if self._closed:
            raise SourceError("synthetic ultrasound source is closed")
        rng = np.random.default_rng(self._seed)
        scene = random_scene(rng, self._height, self._width)
        velocities = [_random_velocity(rng) for _ in scene.lesions]
        index = 0
        while (self._n_frames is None or index < self._n_frames) and not self._closed:
            image, mask = render(scene, rng)
            frame = SourceFrame(
                index=index,
                pixels=image,
                timestamp_s=index / self._fps,
                spacing_mm=self._spacing_mm,
            )
            yield frame, mask
            scene, velocities = _drift(scene, velocities, rng)
            index += 1

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> SyntheticUltrasoundSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Per-lesion motion: (row px, column px, radians) per frame.
_Velocity = tuple[float, float, float]
# Lesions never move faster than this many pixels per frame.
_MAX_SPEED = 1.0


def _random_velocity(rng: np.random.Generator) -> _Velocity:
    speed = rng.uniform(0.2, 0.8)
    heading = rng.uniform(0.0, 2 * math.pi)
    return (
        speed * math.sin(heading),
        speed * math.cos(heading),
        rng.uniform(-0.004, 0.004),
    )


def _drift(scene: Scene, velocities: list[_Velocity], rng: np.random.Generator) -> tuple[Scene, list[_Velocity]]:
    """Move every lesion one frame along its velocity, bouncing off the region."""
    geo = scene.geometry
    r_lo, r_hi, half = _lesion_region(geo)
    lesions: list[Lesion] = []
    new_velocities: list[_Velocity] = []
    for lesion, (vy, vx, spin) in zip(scene.lesions, velocities, strict=True):
        # A slow random walk on the velocity keeps the motion from looking linear.
        vy += rng.normal(0.0, 0.03)
        vx += rng.normal(0.0, 0.03)
        speed = math.hypot(vy, vx)
        if speed > _MAX_SPEED:
            vy, vx = vy * _MAX_SPEED / speed, vx * _MAX_SPEED / speed
        row, col = lesion.center[0] + vy, lesion.center[1] + vx
        r = math.hypot(row - geo.apex[0], col - geo.apex[1])
        t = math.atan2(col - geo.apex[1], row - geo.apex[0])
        if not (r_lo <= r <= r_hi and abs(t) <= half):
            vy, vx = -vy, -vx
            row, col = lesion.center
        lesions.append(replace(lesion, center=(row, col), angle=lesion.angle + spin))
        new_velocities.append((vy, vx, spin))
    return replace(scene, lesions=tuple(lesions)), new_velocities
