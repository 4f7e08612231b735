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
