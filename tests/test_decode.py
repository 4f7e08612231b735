from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgescope.errors import FrameError
from edgescope.runtime.pipeline.decode import decode_frame, encode_raw
from edgescope.v1 import manifest_pb2, stream_pb2


def _raw_frame(**fields: object) -> stream_pb2.Frame:
    return stream_pb2.Frame(raw=stream_pb2.RawImage(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pixels",
    [
        np.arange(12, dtype=np.uint8).reshape(3, 4),
        np.arange(36, dtype=np.uint8).reshape(3, 4, 3),
        (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4),
        (np.arange(60, dtype=np.uint16) * 1000).reshape(3, 4, 5),
        np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 4, 2),
        np.arange(12, dtype=np.uint8).reshape(3, 4, 1),
    ],
)
def test_raw_round_trip(pixels: np.ndarray) -> None:
    message = encode_raw(pixels)
    decoded = decode_frame(stream_pb2.Frame(raw=message))
    assert decoded.dtype == pixels.dtype
    np.testing.assert_array_equal(decoded.reshape(pixels.shape), pixels)
    if pixels.ndim == 3 and pixels.shape[2] != 3:
        assert message.format == stream_pb2.PIXEL_FORMAT_CHANNELS and message.channels == pixels.shape[2]


def test_raw_channels_are_bounded() -> None:
    for channels in (0, 257):
        frame = _raw_frame(
            width=2,
            height=2,
            channels=channels,
            dtype=manifest_pb2.DATA_TYPE_UINT8,
            format=stream_pb2.PIXEL_FORMAT_CHANNELS,
            data=bytes(4 * channels),
        )
        with pytest.raises(FrameError, match="CHANNELS needs 1 to 256 channels"):
            decode_frame(frame)
    with pytest.raises(FrameError, match="cannot send pixels"):
        encode_raw(np.zeros((2, 2, 257), np.uint8))


def test_bgr_is_returned_as_rgb() -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red
    message = encode_raw(rgb)
    message.format = stream_pb2.PIXEL_FORMAT_BGR
    message.data = np.ascontiguousarray(rgb[..., ::-1]).tobytes()
    decoded = decode_frame(stream_pb2.Frame(raw=message))
    np.testing.assert_array_equal(decoded, rgb)


@pytest.mark.parametrize("codec", [".png", ".jpg"])
def test_encoded_images_decode_to_rgb(codec: str) -> None:
    rgb = np.zeros((32, 48, 3), dtype=np.uint8)
    rgb[:, :24, 0] = 255
    ok, data = cv2.imencode(codec, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    encoding = stream_pb2.ENCODING_PNG if codec == ".png" else stream_pb2.ENCODING_JPEG
    decoded = decode_frame(stream_pb2.Frame(encoded=stream_pb2.EncodedImage(encoding=encoding, data=data.tobytes())))
    assert decoded.shape == (32, 48, 3)
    assert decoded[16, 5, 0] > 240 and decoded[16, 5, 2] < 15  # red stays red: channel order is RGB


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (stream_pb2.Frame(), "no pixels"),
        (
            _raw_frame(
                width=4,
                height=3,
                channels=1,
                dtype=manifest_pb2.DATA_TYPE_UINT8,
                format=stream_pb2.PIXEL_FORMAT_GRAY,
                data=b"\0" * 11,
            ),
            "needs 12",
        ),
        (
            _raw_frame(
                width=4,
                height=3,
                channels=1,
                dtype=manifest_pb2.DATA_TYPE_INT64,
                format=stream_pb2.PIXEL_FORMAT_GRAY,
                data=b"\0" * 96,
            ),
            "DATA_TYPE_INT64 is not supported",
        ),
        (
            _raw_frame(width=4, height=3, channels=1, dtype=99, format=stream_pb2.PIXEL_FORMAT_GRAY, data=b"\0" * 12),
            "99 is not supported",
        ),
        (
            _raw_frame(
                width=0, height=3, channels=1, dtype=manifest_pb2.DATA_TYPE_UINT8, format=stream_pb2.PIXEL_FORMAT_GRAY
            ),
            "empty",
        ),
        (
            _raw_frame(
                width=100000,
                height=100000,
                channels=1,
                dtype=manifest_pb2.DATA_TYPE_UINT8,
                format=stream_pb2.PIXEL_FORMAT_GRAY,
                data=b"\0",
            ),
            "exceeds",
        ),
        (
            _raw_frame(
                width=4,
                height=3,
                channels=1,
                dtype=manifest_pb2.DATA_TYPE_UINT8,
                format=stream_pb2.PIXEL_FORMAT_RGB,
                data=b"\0" * 12,
            ),
            "needs 3 channel",
        ),
        (
            stream_pb2.Frame(
                encoded=stream_pb2.EncodedImage(encoding=stream_pb2.ENCODING_PNG, data=b"\x89PNG\r\n\x1a\n garbage")
            ),
            "corrupt",
        ),
        (stream_pb2.Frame(encoded=stream_pb2.EncodedImage(encoding=stream_pb2.ENCODING_JPEG)), "empty"),
        (stream_pb2.Frame(encoded=stream_pb2.EncodedImage(data=b"xx")), "PNG or JPEG"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(frame: stream_pb2.Frame, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_frame(frame)


def test_truncated_jpeg_is_rejected() -> None:
    ok, data = cv2.imencode(".jpg", np.full((64, 64, 3), 128, dtype=np.uint8))
    assert ok
    frame = stream_pb2.Frame(
        encoded=stream_pb2.EncodedImage(encoding=stream_pb2.ENCODING_JPEG, data=data.tobytes()[:20])
    )
    with pytest.raises(FrameError, match="could not be decoded"):
        decode_frame(frame)
