"""open_source spec parsing and to_display_rgb8."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from edgescope.errors import ConfigError, FrameError, SourceError
from edgescope.runtime.sources import SPEC_FORMS, FrameSource, open_source, to_display_rgb8
from edgescope.runtime.sources.dicom import DicomCineSource
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.runtime.sources.video import VideoFileSource


def _data(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        pytest.fail(f"{name} not found: the tests need pydicom-data (pip install edgescope[dev])")
    return Path(found)


def test_dicom_spec() -> None:
    path = _data("OBXXXX1A_2frame.dcm")
    with open_source(f"dicom:{path}") as source:
        assert isinstance(source, DicomCineSource)
        assert source.kind == "ultrasound"
        assert len(list(source)) == 2


def test_dicom_spec_with_loop() -> None:
    with open_source(f"dicom:{_data('OBXXXX1A_2frame.dcm')}", loop=True) as source:
        assert [f.index for f in itertools.islice(source, 5)] == [0, 1, 2, 3, 4]


def test_video_spec(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 15.0, (32, 32))
    for _ in range(3):
        writer.write(np.full((32, 32, 3), 128, dtype=np.uint8))
    writer.release()
    with open_source(f"video:{path}") as source:
        assert isinstance(source, VideoFileSource)
        assert source.fps == pytest.approx(15.0)
        assert len(list(source)) == 3


def test_synthetic_spec_with_parameters() -> None:
    with open_source("synthetic:ultrasound?frames=3&seed=1&fps=20&height=96&width=128") as source:
        assert isinstance(source, SyntheticUltrasoundSource)
        assert source.kind == "ultrasound"
        assert source.fps == 20.0
        frames = list(source)
    assert len(frames) == 3
    assert frames[0].pixels.shape == (96, 128)
    assert [f.timestamp_s for f in frames] == pytest.approx([0.0, 0.05, 0.1])


def test_synthetic_spec_is_endless_by_default() -> None:
    source: FrameSource = open_source("synthetic:ultrasound?height=64&width=64")
    with source:
        assert len(list(itertools.islice(source, 4))) == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rtmp://camera/stream", "unknown source scheme 'rtmp'"),
        ("movie.mp4", "invalid source"),
        ("dicom:", "invalid source"),
        ("synthetic:microscopy", "unknown synthetic source"),
        ("synthetic:ultrasound?speed=2", "unknown parameter 'speed'"),
        ("synthetic:ultrasound?frames=many", "not an integer"),
        ("synthetic:ultrasound?frames=2&frames=3", "given twice"),
        ("synthetic:ultrasound?fps=fast", "not a number"),
        ("synthetic:ultrasound?frames", "malformed"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        open_source(spec)
    if "scheme" in message or "invalid" in message:
        for form in SPEC_FORMS:
            assert form in str(info.value)


def test_array_file_frames_keep_their_channels(tmp_path: Path) -> None:
    frames = np.arange(3 * 4 * 5 * 6, dtype=np.uint16).reshape(3, 4, 5, 6)
    np.save(tmp_path / "features.npy", frames)
    with open_source(f"npy:{tmp_path / 'features.npy'}?fps=10") as source:
        read = list(source)
    assert [f.pixels.shape for f in read] == [(4, 5, 6)] * 3
    np.testing.assert_array_equal(read[2].pixels, frames[2])
    assert [f.timestamp_s for f in read] == pytest.approx([0.0, 0.1, 0.2])
    np.save(tmp_path / "gray.npy", frames[..., :1].astype(np.uint8))
    with open_source(f"npy:{tmp_path / 'gray.npy'}", loop=True) as source:
        looped = list(itertools.islice(source, 5))
    assert [f.pixels.shape for f in looped] == [(4, 5)] * 5 and looped[3].index == 3


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 4, 4), np.float32), "float32 frames are not supported"),
        (np.zeros((4, 4), np.uint8), "frames are \\(T, H, W\\) or \\(T, H, W, C\\)"),
        (np.zeros((1, 2, 2, 300), np.uint8), "at most 256"),
        (np.array([{"a": 1}], dtype=object), "cannot read"),
    ],
)
def test_array_files_that_are_not_frames_are_refused(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", array, allow_pickle=True)
    with pytest.raises(SourceError, match=message):
        open_source(f"npy:{tmp_path / 'bad.npy'}")


def test_synthetic_with_fixed_length_cannot_loop() -> None:
    with pytest.raises(ConfigError, match="cannot loop"):
        open_source("synthetic:ultrasound?frames=3", loop=True)


def test_file_errors_are_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        open_source(f"dicom:{tmp_path / 'missing.dcm'}")
    with pytest.raises(SourceError, match="not found"):
        open_source(f"video:{tmp_path / 'missing.mp4'}")


def test_display_grey_uint8_is_repeated() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_display_rgb8(grey)
    assert rgb.shape == (3, 4, 3)
    assert rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], grey)


def test_display_uint16_is_windowed_to_its_range() -> None:
    grey = np.array([[1000, 1500], [2000, 1250]], dtype=np.uint16)
    rgb = to_display_rgb8(grey)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 128], [255, 64]])


def test_display_uint16_rgb_keeps_colour_balance() -> None:
    rgb16 = np.zeros((1, 2, 3), dtype=np.uint16)
    rgb16[0, 0] = (4000, 2000, 0)
    rgb16[0, 1] = (0, 0, 1000)
    np.testing.assert_array_equal(to_display_rgb8(rgb16), [[[255, 128, 0], [0, 0, 64]]])


def test_display_constant_uint16_is_black() -> None:
    assert not to_display_rgb8(np.full((4, 4), 777, dtype=np.uint16)).any()


def test_display_rgb_uint8_is_an_equal_copy() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    shown = to_display_rgb8(rgb)
    np.testing.assert_array_equal(shown, rgb)
    shown[:] = 0
    assert rgb.any()


def test_display_of_a_real_16bit_frame() -> None:
    path = _data("MR_small.dcm")
    raw = pydicom.dcmread(path).pixel_array
    with open_source(f"dicom:{path}") as source:
        rgb = to_display_rgb8(next(iter(source)).pixels)
    assert rgb.shape == (*raw.shape, 3)
    # Brightest and darkest stored values land on white and black.
    assert (rgb[raw == raw.max()] == 255).all()
    assert (rgb[raw == raw.min()] == 0).all()


def test_display_of_many_channels_shows_the_first() -> None:
    pixels = np.zeros((4, 6, 5), dtype=np.uint16)
    pixels[1, 2, 0] = 1000  # only the first channel has structure; the others would wash it out
    pixels[:, :, 1:] = 7
    rgb = to_display_rgb8(pixels)
    assert rgb.shape == (4, 6, 3)
    assert (rgb[1, 2] == 255).all() and rgb.sum() == 255 * 3


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4, 0), dtype=np.uint8), np.zeros(4, dtype=np.uint8)],
)
def test_display_rejects_other_layouts(pixels: np.ndarray) -> None:
    with pytest.raises(FrameError):
        to_display_rgb8(pixels)
