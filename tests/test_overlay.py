"""Overlay videos people can open, and what an overlay shows.

Browser playback is checked in headless Chromium when it is installed (the
``<video>`` element must reach readyState >= 2, HAVE_CURRENT_DATA); without
Chromium, PyAV must report a codec, pixel format and layout browsers play.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from edgescope.errors import ConfigError
from edgescope.runtime.client.rate import RateWatch
from edgescope.runtime.client.video import VideoRecorder
from edgescope.runtime.pipeline.encode import encode_mask, encode_png, encode_tensor
from edgescope.runtime.render.overlay import draw_overlay, render_result
from edgescope.v1 import stream_pb2

GREEN = (40, 220, 90)


def _clip(path: Path, height: int, width: int, frames: int = 20) -> list[np.ndarray]:
    images = []
    with VideoRecorder(path, 30.0) as recorder:
        for i in range(frames):
            image = np.zeros((height, width, 3), np.uint8)
            image[:, (7 * i) % width] = 255
            image[:, -1] = 200  # the last column, which trimming would lose
            recorder.write(image)
            images.append(image)
    return images


def _browser_ready_state(video: Path) -> int | None:
    """readyState headless Chromium reaches for ``video``; None when Chromium is not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        return None
    page = video.with_suffix(".html")
    page.write_text(
        f'<!doctype html><title>pending</title><video id="v" src="{video.name}" muted preload="auto"></video>'
        "<script>const v = document.getElementById('v');"
        "v.addEventListener('loadeddata', () => document.title = 'state ' + v.readyState);"
        "v.addEventListener('error', () => document.title = 'error ' + v.error.code);</script>",
        encoding="utf-8",
    )
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    run = subprocess.run([*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    title = run.stdout.partition("<title>")[2].partition("</title>")[0]
    assert title.startswith("state "), f"the browser did not load {video.name}: {title!r}"
    return int(title.removeprefix("state "))


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "h264"), (".webm", "vp9")])
def test_overlay_video_plays_in_a_browser(tmp_path: Path, suffix: str, codec: str) -> None:
    path = tmp_path / f"overlay{suffix}"
    _clip(path, 120, 160)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == codec
        assert stream.codec_context.pix_fmt == "yuv420p"  # what browsers decode
        decoded = sum(1 for _ in container.decode(stream))
    assert decoded == 20
    if suffix == ".mp4":
        data = path.read_bytes()
        assert data.index(b"moov") < data.index(b"mdat"), "the index must come first to play while downloading"
    state = _browser_ready_state(path)
    if state is not None:
        assert state >= 2


def test_an_odd_sized_frame_keeps_every_pixel(tmp_path: Path) -> None:
    path = tmp_path / "odd.mp4"
    images = _clip(path, 195, 183, frames=3)
    with av.open(str(path)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert first.shape == (196, 184, 3)  # one black row and column added, none removed
    assert abs(float(first[:195, 182].mean()) - 200) < 12  # the last column is still there
    assert float(np.abs(first[:195, :183].astype(int) - images[0].astype(int)).mean()) < 6


def test_a_frame_of_another_size_and_an_unknown_suffix_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.mp4 \(H\.264\), \.webm"):
        VideoRecorder(tmp_path / "x.mov", 30.0)
    with VideoRecorder(tmp_path / "x.mp4", 30.0) as recorder:
        recorder.write(np.zeros((64, 64, 3), np.uint8))
        with pytest.raises(ConfigError, match="frames are"):
            recorder.write(np.zeros((32, 64, 3), np.uint8))


def _segmentation_result(mask: np.ndarray) -> stream_pb2.Result:
    result = stream_pb2.Result()
    result.outputs.add(name="mask", mask=encode_mask(mask, ["background", "lesion"], stream_pb2.MASK_ENCODING_PNG))
    return result


def test_text_goes_in_a_band_below_and_leaves_the_image_alone() -> None:
    frame = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    mask = np.zeros((240, 320), np.uint8)
    mask[100:140, 100:160] = 1
    shown = render_result(frame, _segmentation_result(mask), ["lesion-unet 1 [onnxruntime] seq 0", "12 ms"], rows=3)
    assert shown.shape[0] > 240 and shown.shape[1] == 320
    outside = np.ones((240, 320), bool)
    outside[95:145, 95:165] = False  # the mask and its outline
    np.testing.assert_array_equal(shown[:240][outside], frame[outside])
    band = shown[240:]
    assert (band > 200).any()  # white text
    assert (np.abs(band.astype(int) - GREEN).sum(axis=-1) == 0).any()  # the legend's swatch for the mask


def test_text_grows_with_the_frame() -> None:
    small = draw_overlay(np.zeros((480, 640, 3), np.uint8), None, ["a line"])
    large = draw_overlay(np.zeros((3000, 3072, 3), np.uint8), None, ["a line"])
    assert (large.shape[0] - 3000) > 3 * (small.shape[0] - 480)


def test_fixed_rows_keep_every_video_frame_the_same_size() -> None:
    frame = np.zeros((120, 160, 3), np.uint8)
    short = render_result(frame, stream_pb2.Result(), ["one"], rows=3)
    long = render_result(frame, _segmentation_result(np.ones((120, 160), np.uint8)), ["1", "2", "3", "4"], rows=3)
    assert short.shape == long.shape


def _legend_colours(shown: np.ndarray, height: int) -> set[tuple[int, int, int]]:
    band = shown[height:].reshape(-1, 3)
    return {tuple(int(v) for v in pixel) for pixel in np.unique(band, axis=0)}


def test_each_task_has_its_legend() -> None:
    frame = np.full((200, 300, 3), 90, np.uint8)
    boxes = stream_pb2.Result()
    boxes.outputs.add(name="boxes").boxes.boxes.add(x_min=10, y_min=10, x_max=80, y_max=60, label_index=1, label="tool")
    shown = render_result(frame, boxes, [])
    assert shown[10, 40].tolist() != [90, 90, 90]  # the box's edge on the image
    assert (250, 80, 80) in _legend_colours(shown, 200)

    classes = stream_pb2.Result()
    classes.outputs.add(name="classes").classes.CopyFrom(
        stream_pb2.ClassScores(labels=["normal", "polyp"], scores=[0.2, 0.8])
    )
    with_classes = render_result(frame, classes, [])
    np.testing.assert_array_equal(with_classes[:200], frame)  # scores are text, in the band only
    assert with_classes.shape[0] > 200

    heat = stream_pb2.Result()
    heat.outputs.add(
        name="heatmap", image=encode_png(np.tile(np.linspace(0, 255, 300).astype(np.uint8)[None], (200, 1)))
    )
    with_heat = render_result(frame, heat, [])
    assert int(with_heat[100, 290, 0]) > int(with_heat[100, 10, 0])  # hot on the right, red
    assert (160, 0, 0) in _legend_colours(with_heat, 200)

    motion = stream_pb2.Result()
    field = np.zeros((2, 200, 300), np.float32)
    field[1] = 3.0  # three pixels to the right everywhere
    motion.outputs.add(name="displacement_px", tensor=encode_tensor("displacement_px", field))
    with_arrows = render_result(frame, motion, [])
    assert (np.abs(with_arrows[:200].astype(int) - (255, 160, 0)).sum(axis=-1) < 60).any()
    assert (255, 160, 0) in _legend_colours(with_arrows, 200)


def test_rate_watch_warns_once_when_the_rate_stays_low() -> None:
    slow = RateWatch(30.0, window_s=1.0, windows=2)
    for i in range(200):
        slow.answered(i / 20.0)  # 20 fps against a 30 fps source
    assert len(slow.warnings) == 1 and "20.0 fps" in slow.warnings[0] and "30.0 fps" in slow.warnings[0]
    steady = RateWatch(30.0, window_s=1.0, windows=2)
    for i in range(200):
        steady.answered(i / 28.0)  # above 90%
    assert steady.warnings == []
    brief = RateWatch(30.0, window_s=1.0, windows=2)
    times = [i / 20.0 for i in range(25)] + [1.25 + i / 30.0 for i in range(200)]
    for t in times:
        brief.answered(t)  # one slow window, then back to the source's rate
    assert brief.warnings == []
