from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgescope.errors import ConfigError, SourceError
from edgescope.runtime.sources import open_source
from edgescope.runtime.sources.endoscopy import SyntheticEndoscopySource, field_of_view
from edgescope.runtime.sources.fluorescence import PerfusionMasks, SyntheticFluorescenceSource


def _nir(seed: int, count: int, fps: float = 25.0, size: int = 128) -> list[tuple[np.ndarray, np.ndarray]]:
    source = SyntheticFluorescenceSource(seed=seed, n_frames=count, fps=fps, height=size, width=size)
    return [(frame.pixels, mask) for frame, mask in source.frames_with_masks()]


def test_frames_are_gray_and_glow_only_where_the_truth_says() -> None:
    inside, _ = field_of_view(128, 128)
    for pixels, mask in _nir(seed=2, count=6, fps=1.0):
        assert pixels.shape == (128, 128) and pixels.dtype == np.uint8 and mask.shape == (128, 128)
        assert pixels[~inside].max() == 0
        assert mask.any() and not mask[~inside].any()
        # Away from the region edges (blurred by scattering), perfused tissue is bright and the rest dark.
        core = cv2.erode(mask, np.ones((9, 9), np.uint8)).astype(bool)
        background = ~cv2.dilate(mask, np.ones((13, 13), np.uint8)).astype(bool) & inside
        assert np.median(pixels[core]) > 80
        assert np.median(pixels[background]) < 30


def test_registered_to_the_endoscope_at_the_same_time() -> None:
    """At equal times the NIR mask (drawn at the white-light size) is where the NIR frame glows, and it moves."""
    white = SyntheticEndoscopySource(seed=5, n_frames=4, fps=0.5, height=160, width=160)
    nir = SyntheticFluorescenceSource(seed=5, n_frames=4, fps=0.5, height=96, width=96)
    pairs = list(zip(white.frames_with_truth(), nir.frames_with_masks(mask_size=(160, 160)), strict=True))
    masks = []
    for (white_frame, truth), (nir_frame, mask) in pairs:
        assert white_frame.timestamp_s == nir_frame.timestamp_s
        # The instrument the white light shows hides the perfused tissue behind it.
        assert not (mask & truth.instrument).any()
        glow = cv2.resize(nir_frame.pixels, (160, 160), interpolation=cv2.INTER_LINEAR) > 60
        inside, _ = field_of_view(160, 160)
        overlap = np.count_nonzero(glow & (mask > 0)) / max(np.count_nonzero((glow | (mask > 0)) & inside), 1)
        assert overlap > 0.8
        masks.append(mask)
    assert not np.array_equal(masks[0], masks[-1])  # the camera moved in 6 s


def _moved(before: np.ndarray, after: np.ndarray) -> tuple[int, int]:
    """How far the content of the frame's centre moved between two frames, in pixels (x, y)."""
    patch = before[96:160, 96:160]
    score = cv2.matchTemplate(after, patch, cv2.TM_CCOEFF_NORMED)
    _, best, _, (x, y) = cv2.minMaxLoc(score)
    assert best > 0.4
    return x - 96, y - 96


@pytest.mark.parametrize("seed", [3, 11])
def test_the_scene_moves_with_the_endoscope_camera(seed: int) -> None:
    """Tissue in white light and glow in NIR move together: both follow the camera's clock."""
    white = SyntheticEndoscopySource(seed=seed, n_frames=2, fps=1 / 3, height=256, width=256)
    nir = SyntheticFluorescenceSource(seed=seed, n_frames=2, fps=1 / 3, height=256, width=256)
    # Median and Gaussian filters hide the glints and the noise, which do not move with the tissue.
    tissue = [cv2.medianBlur(frame.pixels[..., 1], 5) for frame in white]
    glow = [cv2.GaussianBlur(frame.pixels, (0, 0), 2) for frame in nir]
    white_x, white_y = _moved(*tissue)
    nir_x, nir_y = _moved(*glow)
    assert white_x < -30  # the camera drifts about 50 pixels in x in 3 s
    assert abs(white_x - nir_x) <= 3 and abs(white_y - nir_y) <= 3


def test_other_sizes_and_rates_show_the_same_view_scaled() -> None:
    """A frame at another size and rate, taken at the same moment, shows the same regions."""
    small = PerfusionMasks(seed=9, height=100, width=100)
    large = PerfusionMasks(seed=9, height=300, width=300)
    for t in (0.0, 1.2, 4.0):
        scaled, same = cv2.resize(large.at(t), (100, 100), interpolation=cv2.INTER_AREA) > 0, small.at(t) > 0
        # Only edge pixels may differ (each size rounds its outlines to its own pixels).
        assert np.count_nonzero(scaled & same) / np.count_nonzero(scaled | same) > 0.93
        assert np.count_nonzero(scaled ^ same) < 0.4 * np.count_nonzero(cv2.Canny(same.astype(np.uint8), 0, 1))
    at_25 = list(SyntheticFluorescenceSource(seed=9, n_frames=6, fps=25.0, height=100, width=100).frames_with_masks())
    at_10 = list(SyntheticFluorescenceSource(seed=9, n_frames=3, fps=10.0, height=100, width=100).frames_with_masks())
    # t = 0.2 s is frame 5 at 25 fps and frame 2 at 10 fps.
    np.testing.assert_array_equal(at_25[5][1], at_10[2][1])
    np.testing.assert_array_equal(at_25[5][1], small.at(0.2))


def test_same_seed_same_video_other_seed_other_scene() -> None:
    first, again, other = _nir(seed=3, count=3), _nir(seed=3, count=3), _nir(seed=4, count=3)
    for (a, ma), (b, mb) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ma, mb)
    assert np.count_nonzero(first[0][1] != other[0][1]) > 500


def test_spec_fps_timestamps_and_end() -> None:
    with open_source("synthetic:fluorescence?frames=5&seed=1&height=96&width=128") as source:
        frames = list(source)
        assert source.kind == "endoscopy" and source.fps == 25.0
    assert [f.timestamp_s for f in frames] == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16])
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert frames[0].pixels.shape == (96, 128) and frames[0].spacing_mm is None
    with open_source("synthetic:fluorescence?frames=2&fps=12.5&height=64&width=64") as source:
        assert [f.timestamp_s for f in source] == pytest.approx([0.0, 0.08])
    assert list(SyntheticFluorescenceSource(n_frames=0, height=64, width=64)) == []


def test_closed_source_refuses() -> None:
    source = SyntheticFluorescenceSource(n_frames=1, height=64, width=64)
    source.close()
    with pytest.raises(SourceError, match="closed"):
        next(iter(source))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:fluorescence?fps=0", "fps"),
        ("synthetic:fluorescence?fps=nan", "fps"),
        ("synthetic:fluorescence?frames=-1", "n_frames"),
        ("synthetic:fluorescence?frames=two", "not an integer"),
        ("synthetic:fluorescence?seed=-3", "seed"),
        ("synthetic:fluorescence?height=10", "at least"),
        ("synthetic:fluorescence?gain=2", "unknown parameter"),
        ("synthetic:fluorescence?fps=25&fps=30", "twice"),
        ("synthetic:fluorescense", "unknown synthetic source"),
    ],
)
def test_bad_spec_values_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_source(spec)


def test_bad_mask_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="mask size"):
        PerfusionMasks(seed=0, height=0, width=64)
