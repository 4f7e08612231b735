"""VideoFileSource against clips written here with OpenCV, so their content is known."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgescope.errors import SourceError
from edgescope.runtime.sources.video import VideoFileSource

# One solid colour per frame, as RGB.
COLOURS_RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (40, 90, 200)]
HEIGHT, WIDTH = 48, 64
FPS = 25.0


def _write_clip(path: Path, fourcc: str) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        pytest.skip(f"this OpenCV build cannot write {fourcc} video")
    try:
        for rgb in COLOURS_RGB:
            frame = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
            frame[:] = rgb[::-1]  # OpenCV writes BGR
            writer.write(frame)
    finally:
        writer.release()
    return path


@pytest.fixture
def lossless_clip(tmp_path: Path) -> Path:
    return _write_clip(tmp_path / "colours.avi", "FFV1")


@pytest.mark.parametrize(
    ("name", "fourcc", "tolerance"),
    [("colours.avi", "FFV1", 0), ("colours-mjpg.avi", "MJPG", 8), ("colours.mp4", "mp4v", 8)],
)
def test_reads_frames_in_rgb_order(tmp_path: Path, name: str, fourcc: str, tolerance: int) -> None:
    path = _write_clip(tmp_path / name, fourcc)
    with VideoFileSource(path) as source:
        assert source.fps == pytest.approx(FPS)
        assert source.kind == "endoscopy"
        frames = list(source)
    assert len(frames) == len(COLOURS_RGB)
    assert [f.index for f in frames] == list(range(len(COLOURS_RGB)))
    assert [f.timestamp_s for f in frames] == pytest.approx([i / FPS for i in range(len(COLOURS_RGB))])
    for frame, rgb in zip(frames, COLOURS_RGB, strict=True):
        assert frame.pixels.shape == (HEIGHT, WIDTH, 3)
        assert frame.pixels.dtype == np.uint8
        assert frame.pixels.flags.c_contiguous
        assert frame.spacing_mm is None
        centre = frame.pixels[HEIGHT // 2, WIDTH // 2].astype(int)
        assert np.abs(centre - np.array(rgb)).max() <= tolerance, (centre, rgb)


def test_frame_count_and_kind_override(lossless_clip: Path) -> None:
    with VideoFileSource(lossless_clip, kind="ultrasound") as source:
        assert source.kind == "ultrasound"
        assert source.frame_count == len(COLOURS_RGB)
        assert source.path == lossless_clip


def test_loop_continues_index_and_time(lossless_clip: Path) -> None:
    n = len(COLOURS_RGB)
    with VideoFileSource(lossless_clip, loop=True) as source:
        frames = list(itertools.islice(source, 2 * n + 1))
    assert [f.index for f in frames] == list(range(2 * n + 1))
    assert [f.timestamp_s for f in frames] == pytest.approx([i / FPS for i in range(2 * n + 1)])
    for i in range(n + 1):
        np.testing.assert_array_equal(frames[i].pixels, frames[i + n].pixels)


def test_iterating_twice_replays(lossless_clip: Path) -> None:
    with VideoFileSource(lossless_clip) as source:
        first = [f.pixels for f in source]
        second = [f.pixels for f in source]
    assert len(first) == len(second) == len(COLOURS_RGB)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_close_stops_iteration_and_refuses_more(lossless_clip: Path) -> None:
    source = VideoFileSource(lossless_clip, loop=True)
    frames = iter(source)
    next(frames)
    source.close()
    assert list(frames) == []
    with pytest.raises(SourceError, match="closed"):
        next(iter(source))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceError, match="not found") as info:
        VideoFileSource(missing)
    assert str(missing) in str(info.value)


def test_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n" * 50)
    with pytest.raises(SourceError, match="cannot open") as info:
        VideoFileSource(path)
    assert str(path) in str(info.value)
