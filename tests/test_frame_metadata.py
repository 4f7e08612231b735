"""A frame's pixel transform and calibrated regions, through a real server.

The server must preprocess with ``Frame.pixel_transform`` and measure in
``Frame.regions``. A synthetic B-mode frame is sent twice: as its 8-bit
pixels, and as 12-bit stored values with a window that presents them as the
same grey levels; the model must see the same picture both times.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread


def _answers(target: str, frames: list[stream_pb2.Frame]) -> list[stream_pb2.Result]:
    async def run() -> list[stream_pb2.Result]:
        async with grpc.aio.insecure_channel(target) as channel:
            call = stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(frames), timeout=60)
            return [result async for result in call]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def lesion_frame() -> Iterator[np.ndarray]:
    with SyntheticUltrasoundSource(seed=3, n_frames=4) as source:
        for frame, truth in source.frames_with_masks():
            if truth.sum() > 500:  # a frame with a lesion worth finding
                yield np.asarray(frame.pixels, dtype=np.uint8)
                return
    pytest.fail("the simulator made no lesion in four frames")


def test_the_server_applies_the_frames_pixel_transform(server: ServerThread, lesion_frame: np.ndarray) -> None:
    plain = stream_pb2.Frame(stream_id="t", seq=0, model="lesion-unet", raw=encode_raw(lesion_frame))
    stored = stream_pb2.Frame(
        stream_id="t", seq=1, model="lesion-unet", raw=encode_raw(lesion_frame.astype(np.uint16) * 16)
    )
    stored.pixel_transform.bits_stored = 12
    stored.pixel_transform.rescale_slope = 1.0
    window = stored.pixel_transform.voi.add(explanation="as 8-bit").window
    window.center, window.width, window.function = 2048, 4096, stream_pb2.VOI_FUNCTION_LINEAR_EXACT
    first, second = _answers(server.target, [plain, stored])
    expected, got = decode_mask(first.outputs[0].mask) > 0, decode_mask(second.outputs[0].mask) > 0
    assert expected.sum() > 0
    dice = 2 * (expected & got).sum() / (expected.sum() + got.sum())
    assert dice > 0.9


def test_the_server_measures_in_the_frames_regions(server: ServerThread, lesion_frame: np.ndarray) -> None:
    height, width = lesion_frame.shape
    frame = stream_pb2.Frame(stream_id="r", seq=0, model="lesion-unet", raw=encode_raw(lesion_frame))
    frame.spacing.row_mm = frame.spacing.column_mm = 0.3
    frame.regions.add(name="ultrasound region 0", x_max=width - 1, y_max=height - 1, row_mm=0.2, column_mm=0.25)
    (result,) = _answers(server.target, [frame])
    areas = [q for q in result.quantities if q.name == "lesion_area"]
    assert [q.region for q in areas] == ["ultrasound region 0"]
    mask = decode_mask(result.outputs[0].mask)
    assert areas[0].value == pytest.approx(int((mask > 0).sum()) * 0.2 * 0.25)


def test_the_example_bundle_is_what_the_server_serves(example_bundle: Bundle, server: ServerThread) -> None:
    # Guards the two tests above: they must fail for the wiring, not for a missing model.
    answers = _answers(
        server.target,
        [stream_pb2.Frame(stream_id="g", seq=0, model="lesion-unet", raw=encode_raw(np.zeros((64, 64), np.uint8)))],
    )
    assert answers[0].provenance.sha256 == example_bundle.onnx_sha256
