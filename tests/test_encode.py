from __future__ import annotations

import zlib

import numpy as np
import pytest

from edgescope.runtime.pipeline.encode import decode_mask, encode_mask, rle_decode, rle_encode
from edgescope.v1 import stream_pb2


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trips_random_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = (rng.random((17, 23)) > rng.random()).astype(np.uint8)
    counts = rle_encode(mask)
    assert sum(counts) == mask.size
    np.testing.assert_array_equal(rle_decode(counts, 17, 23), mask)


def test_rle_starts_with_a_zero_run() -> None:
    mask = np.array([[1, 1, 0], [0, 1, 1]], dtype=np.uint8)
    assert rle_encode(mask) == [0, 2, 2, 2]
    assert rle_encode(np.zeros((2, 2), np.uint8)) == [4]


@pytest.mark.parametrize("encoding", [stream_pb2.MASK_ENCODING_PNG, stream_pb2.MASK_ENCODING_RLE])
def test_mask_message_round_trip(encoding: int) -> None:
    mask = np.zeros((40, 30), dtype=np.uint8)
    mask[5:20, 3:9] = 1
    message = encode_mask(mask, ["background", "lesion"], encoding)
    assert message.encoding == encoding
    assert (message.width, message.height) == (30, 40)
    np.testing.assert_array_equal(decode_mask(message), mask)


def test_rle_refuses_multi_class_masks() -> None:
    mask = np.array([[0, 2]], dtype=np.uint8)
    with pytest.raises(Exception, match="one label"):
        encode_mask(mask, [], stream_pb2.MASK_ENCODING_RLE)


def _png_rows(png: bytes) -> list[bytes]:
    """The PNG's decompressed scanlines, each still led by its filter-type byte."""
    chunks, offset = b"", 8
    width = int.from_bytes(png[16:20], "big")
    while offset < len(png):
        length = int.from_bytes(png[offset : offset + 4], "big")
        if png[offset + 4 : offset + 8] == b"IDAT":
            chunks += png[offset + 8 : offset + 8 + length]
        offset += 12 + length
    data = zlib.decompress(chunks)
    return [data[i : i + width + 1] for i in range(0, len(data), width + 1)]


def test_png_masks_are_written_unfiltered_and_decode_exactly() -> None:
    # Unfiltered rows are what makes a mask cheap to decode at the client; the labels survive as they are.
    rng = np.random.default_rng(3)
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:30, 5:40] = 1
    mask[rng.random(mask.shape) > 0.97] = 2
    message = encode_mask(mask, ["background", "lesion", "vessel"], stream_pb2.MASK_ENCODING_PNG)
    rows = _png_rows(message.png)
    assert len(rows) == 48
    assert {row[0] for row in rows} == {0}
    np.testing.assert_array_equal(decode_mask(message), mask)
