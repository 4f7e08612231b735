from __future__ import annotations

import numpy as np
import pytest

from edgescope.runtime.pipeline.postprocess import to_frame_grid
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.v1 import manifest_pb2


def _spec(**fields: object) -> manifest_pb2.Preprocessing:
    base: dict[str, object] = {
        "height": 64,
        "width": 64,
        "color": manifest_pb2.COLOR_MODE_GRAY,
        "resize": manifest_pb2.RESIZE_MODE_STRETCH,
        "layout": manifest_pb2.LAYOUT_NCHW,
        "scale": 1 / 255,
    }
    base.update(fields)
    return manifest_pb2.Preprocessing(**base)  # type: ignore[arg-type]


def test_stretch_gray_scales_to_unit_range() -> None:
    pixels = np.full((120, 160), 255, dtype=np.uint8)
    tensor, geometry = preprocess(pixels, _spec())
    assert tensor.shape == (1, 1, 64, 64)
    assert tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, 1.0, rtol=1e-6)
    assert (geometry.frame_height, geometry.frame_width) == (120, 160)


def test_uint16_maps_onto_the_8bit_range() -> None:
    tensor, _ = preprocess(np.full((64, 64), 65535, dtype=np.uint16), _spec())
    np.testing.assert_allclose(tensor, 1.0, rtol=1e-5)


def test_rgb_to_gray_and_mean_std() -> None:
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[..., 1] = 255  # pure green: gray = 0.587 * 255
    tensor, _ = preprocess(rgb, _spec(mean=[0.5], std=[0.25]))
    np.testing.assert_allclose(tensor, (round(0.587 * 255) / 255 - 0.5) / 0.25, atol=2e-2)


def test_nhwc_rgb_layout() -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 2] = 255
    tensor, _ = preprocess(rgb, _spec(color=manifest_pb2.COLOR_MODE_BGR, layout=manifest_pb2.LAYOUT_NHWC))
    assert tensor.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(tensor[0, 10, 10], [1.0, 0.0, 0.0])  # blue comes first in BGR


def test_letterbox_geometry_maps_masks_back_to_the_frame() -> None:
    frame = np.zeros((100, 200), dtype=np.uint8)
    frame[40:60, 50:150] = 255
    tensor, geometry = preprocess(frame, _spec(resize=manifest_pb2.RESIZE_MODE_LETTERBOX))
    # A 2:1 frame in a square input: 64x32 image centred vertically, padding above and below.
    assert (geometry.top, geometry.left, geometry.height, geometry.width) == (16, 0, 32, 64)
    assert tensor[0, 0, :16].max() == 0.0
    model_mask = (tensor[0, 0] > 0.5).astype(np.uint8)
    back = to_frame_grid(model_mask, geometry)
    assert back.shape == frame.shape
    assert np.mean(back == (frame > 0)) > 0.97


def test_missing_input_size_is_a_bundle_error() -> None:
    with pytest.raises(Exception, match="height/width"):
        preprocess(np.zeros((4, 4), np.uint8), _spec(height=0))


def _channels_spec(channels: int, **fields: object) -> manifest_pb2.Preprocessing:
    return _spec(color=manifest_pb2.COLOR_MODE_CHANNELS, channels=channels, **fields)


def test_channels_are_taken_as_sent_with_per_channel_normalisation() -> None:
    # Six channels, each a constant: resizing (in groups of four) keeps each channel's value and order.
    values = np.array([0, 50, 100, 150, 200, 250], dtype=np.uint16) * 257
    pixels = np.broadcast_to(values, (120, 160, 6)).copy()
    mean, std = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.5, 0.5, 0.25, 0.25, 1.0, 2.0]
    tensor, _ = preprocess(pixels, _channels_spec(6, mean=mean, std=std))
    assert tensor.shape == (1, 6, 64, 64)
    expected = (values / 65535.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(tensor[0, :, 10, 20], expected, rtol=1e-5)
    nhwc, _ = preprocess(pixels, _channels_spec(6, mean=mean, std=std, layout=manifest_pb2.LAYOUT_NHWC))
    np.testing.assert_allclose(nhwc[0].transpose(2, 0, 1), tensor[0], rtol=1e-6)


def test_many_channels_resize_like_each_channel_alone() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (90, 70, 5), dtype=np.uint8)
    tensor, _ = preprocess(pixels, _channels_spec(5, resize=manifest_pb2.RESIZE_MODE_LETTERBOX))
    for channel in range(5):
        alone, _ = preprocess(
            np.ascontiguousarray(pixels[:, :, channel]), _spec(resize=manifest_pb2.RESIZE_MODE_LETTERBOX)
        )
        np.testing.assert_array_equal(tensor[0, channel], alone[0, 0])


def test_a_frame_with_other_channels_is_refused() -> None:
    from edgescope.errors import FrameError

    with pytest.raises(FrameError, match="takes frames of 5 channel"):
        preprocess(np.zeros((8, 8, 3), np.uint8), _channels_spec(5))
    with pytest.raises(FrameError, match="gray or RGB frames; this frame has 5 channels"):
        preprocess(np.zeros((8, 8, 5), np.uint8), _spec())
    # Three channels taken as sent are not converted: a BGR-ordered model would swap them.
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[..., 0] = 255
    tensor, _ = preprocess(pixels, _channels_spec(3, height=8, width=8))
    assert tensor[0, 0].min() == 1.0 and tensor[0, 1:].max() == 0.0
