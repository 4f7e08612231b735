from __future__ import annotations

import itertools
from dataclasses import replace

import cv2
import numpy as np
import pytest

from edgescope.errors import ConfigError, SourceError
from edgescope.runtime.sources.base import FrameSource
from edgescope.runtime.sources.synthetic import (
    Lesion,
    Scene,
    SyntheticUltrasoundSource,
    fan_mask,
    random_scene,
    render,
    simulate_ultrasound,
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _inside_and_ring(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lesion's core and a band of tissue around it, clear of the soft edge."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    core = cv2.erode(mask, kernel, iterations=2).astype(bool)
    near = cv2.dilate(mask, kernel, iterations=2).astype(bool)
    far = cv2.dilate(mask, kernel, iterations=5).astype(bool)
    return core, far & ~near


def _scene_with(lesion: Lesion, seed: int = 7) -> Scene:
    return replace(random_scene(np.random.default_rng(seed), max_lesions=0), lesions=(lesion,))


def test_outside_the_fan_is_black() -> None:
    rng = np.random.default_rng(0)
    fan = fan_mask(480, 640)
    for _ in range(3):
        image, mask = simulate_ultrasound(rng)
        assert image.shape == mask.shape == (480, 640)
        assert image.dtype == mask.dtype == np.uint8
        assert not image[~fan].any()
        assert not mask[~fan].any()
        assert image[fan].mean() > 40  # the field of view itself is not black
    # Apex at the top centre: the fan's top row is in the middle, not the corners.
    rows = np.flatnonzero(fan.any(axis=1))
    top = np.flatnonzero(fan[rows[0]])
    assert abs(top.mean() - 319.5) < 2
    assert not fan[-1, 0] and not fan[-1, -1]


@pytest.mark.parametrize(("contrast_db", "darker"), [(-12.0, True), (9.0, False)])
def test_lesion_contrast_against_surrounding_tissue(contrast_db: float, darker: bool) -> None:
    lesion = Lesion(center=(300.0, 300.0), axes=(45.0, 30.0), angle=0.5, contrast_db=contrast_db)
    image, mask = render(_scene_with(lesion), np.random.default_rng(1))
    core, ring = _inside_and_ring(mask)
    assert core.sum() > 500 and ring.sum() > 500
    difference = float(image[core].mean()) - float(image[ring].mean())
    if darker:
        assert difference < -25
    else:
        assert difference > 20


def test_random_lesions_are_hypo_or_hyperechoic() -> None:
    checked = 0
    for seed in range(8):
        scene = random_scene(np.random.default_rng(seed))
        for lesion in scene.lesions:
            image, mask = render(replace(scene, lesions=(lesion,)), np.random.default_rng(seed))
            core, ring = _inside_and_ring(mask)
            difference = float(image[core].mean()) - float(image[ring].mean())
            assert difference < -10 if lesion.hypoechoic else difference > 10
            checked += 1
    assert checked >= 5


def test_lesion_count_varies_from_zero_to_three() -> None:
    counts = {len(random_scene(np.random.default_rng(s)).lesions) for s in range(40)}
    assert counts == {0, 1, 2, 3}


def test_same_seed_same_frames_and_different_seed_different_frames() -> None:
    a_image, a_mask = simulate_ultrasound(np.random.default_rng(5))
    b_image, b_mask = simulate_ultrasound(np.random.default_rng(5))
    c_image, _ = simulate_ultrasound(np.random.default_rng(6))
    assert np.array_equal(a_image, b_image) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_image, c_image)

    def pixels(seed: int) -> list[np.ndarray]:
        with SyntheticUltrasoundSource(seed=seed, n_frames=3, height=120, width=160) as source:
            return [frame.pixels for frame in source]

    assert all(np.array_equal(x, y) for x, y in zip(pixels(3), pixels(3), strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(pixels(3), pixels(4), strict=True))


def test_source_yields_frames_with_timestamps_and_shape() -> None:
    source: FrameSource = SyntheticUltrasoundSource(
        seed=1, n_frames=5, fps=25.0, height=240, width=320, spacing_mm=(0.5, 0.4)
    )
    with source:
        frames = list(source)
    assert source.kind == "ultrasound" and source.fps == 25.0
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert [f.timestamp_s for f in frames] == pytest.approx([i / 25.0 for i in range(5)])
    for frame in frames:
        assert frame.pixels.shape == (240, 320)
        assert frame.pixels.dtype == np.uint8
        assert frame.pixels.flags.c_contiguous
        assert frame.spacing_mm == (0.5, 0.4)
    # Speckle is new in every frame.
    diff = np.abs(frames[0].pixels.astype(int) - frames[1].pixels.astype(int))
    assert diff[fan_mask(240, 320)].mean() > 10


def test_endless_when_n_frames_is_none() -> None:
    source = SyntheticUltrasoundSource(seed=2, height=96, width=128)
    frames = list(itertools.islice(source, 50))
    assert len(frames) == 50 and frames[-1].index == 49


def test_lesions_drift_slowly_between_frames() -> None:
    source = SyntheticUltrasoundSource(seed=0, n_frames=30)
    masks = [mask.astype(bool) for _, mask in source.frames_with_masks()]
    assert masks[0].any()
    consecutive = [_iou(a, b) for a, b in itertools.pairwise(masks)]
    assert min(consecutive) > 0.85
    assert np.mean(consecutive) < 1.0
    # Over a second the motion adds up.
    assert _iou(masks[0], masks[-1]) < min(consecutive)


def test_closed_source_refuses_to_iterate() -> None:
    source = SyntheticUltrasoundSource(seed=0, n_frames=10, height=96, width=128)
    frames = iter(source)
    next(frames)
    source.close()
    assert list(frames) == []  # a running iteration ends
    with pytest.raises(SourceError):
        next(iter(source))


@pytest.mark.parametrize(
    "kwargs",
    [{"fps": 0.0}, {"fps": float("nan")}, {"n_frames": -1}, {"height": 32}, {"width": 10}],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SyntheticUltrasoundSource(**kwargs)  # type: ignore[arg-type]
