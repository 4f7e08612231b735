from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgescope.errors import ConfigError
from edgescope.runtime.sources import open_source
from edgescope.runtime.sources.endoscopy import SyntheticEndoscopySource, field_of_view


def _frames(seed: int = 0, count: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    source = SyntheticEndoscopySource(seed=seed, n_frames=count, height=180, width=320)
    return [(frame.pixels, mask) for frame, mask in source.frames_with_masks()]


def test_frames_are_rgb_inside_a_round_aperture() -> None:
    (pixels, _), *_ = _frames()
    assert pixels.shape == (180, 320, 3) and pixels.dtype == np.uint8
    inside, _ = field_of_view(180, 320)
    assert pixels[~inside].max() == 0
    tissue = pixels[inside].astype(np.float32)
    assert tissue[:, 0].mean() > tissue[:, 1].mean() + 30  # mucosa is red, not grey


def test_the_instrument_mask_marks_grey_metal() -> None:
    for pixels, mask in _frames():
        assert mask.any()
        hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)
        inside, _ = field_of_view(180, 320)
        tissue = inside & (mask == 0)
        # The instrument is far less saturated than the tissue around it.
        assert np.median(hsv[..., 1][mask > 0]) < 0.5 * np.median(hsv[..., 1][tissue])


def test_same_seed_same_video_and_the_camera_moves() -> None:
    first, again, other = _frames(seed=3), _frames(seed=3), _frames(seed=4)
    for (a, _), (b, _) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0][0], other[0][0])
    step = np.abs(first[0][0].astype(np.int16) - first[-1][0].astype(np.int16)).mean()
    assert step > 1.0


def test_open_source_spec_and_timing() -> None:
    with open_source("synthetic:endoscopy?frames=4&fps=25&height=96&width=128") as source:
        frames = list(source)
    assert source.kind == "endoscopy"
    assert [f.timestamp_s for f in frames] == pytest.approx([0.0, 0.04, 0.08, 0.12])
    assert frames[0].spacing_mm is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least"):
        SyntheticEndoscopySource(height=10, width=10)
    with pytest.raises(ConfigError, match="fps"):
        SyntheticEndoscopySource(fps=0)
