"""Property-based fuzzing (hypothesis) of frame decoding and of the servicer, bounded in examples and time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import cv2
import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgescope.errors import FrameError
from edgescope.runtime.pipeline.decode import FrameLimits, decode_frame
from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

DECODING = settings(max_examples=400, deadline=2000, database=None)
SERVING = settings(
    max_examples=60, deadline=10_000, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
LIMITS = FrameLimits(max_pixels=1_000_000)


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(3)
    images = []
    for extension, pixels in [
        (".png", rng.integers(0, 255, (12, 16), dtype=np.uint8)),
        (".png", rng.integers(0, 65535, (9, 7, 3), dtype=np.uint16)),
        (".jpg", rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)),
        (".jpg", rng.integers(0, 255, (8, 8), dtype=np.uint8)),
    ]:
        ok, data = cv2.imencode(extension, pixels)
        assert ok
        images.append(bytes(data.tobytes()))
    return images


SEEDS = _seed_images()


@st.composite
def mutated_image(draw: st.DrawFn) -> stream_pb2.Frame:
    """A real PNG or JPEG with bytes flipped, cut or inserted, under either label."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(max_size=16))
    encoding = draw(st.sampled_from([stream_pb2.ENCODING_PNG, stream_pb2.ENCODING_JPEG]))
    return stream_pb2.Frame(encoded=stream_pb2.EncodedImage(encoding=encoding, data=bytes(data)))


@st.composite
def raw_frame(draw: st.DrawFn) -> stream_pb2.Frame:
    width, height = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    channels = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from([0, *manifest_pb2.DataType.values(), 99]))
    itemsize = {manifest_pb2.DATA_TYPE_UINT16: 2, manifest_pb2.DATA_TYPE_FLOAT32: 4}.get(dtype, 1)
    exact = width * height * channels * itemsize
    size = draw(st.sampled_from([exact, max(0, exact - 1), exact + 1, 0]))
    data = draw(st.binary(min_size=size, max_size=size)) if size <= 20_000 else bytes(size)
    image = stream_pb2.RawImage(
        width=width,
        height=height,
        channels=channels,
        dtype=dtype,  # type: ignore[arg-type]
        format=draw(st.integers(0, 4)),  # type: ignore[arg-type]
        data=data,
    )
    return stream_pb2.Frame(raw=image)


@st.composite
def header_bomb(draw: st.DrawFn) -> stream_pb2.Frame:
    """A well-formed header declaring any size, bit depth and colour type, with nothing behind it."""
    from .bad_inputs import jpeg_segments, png_with_header, sof

    width, height = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        data = png_with_header(width, height, draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.integers(0, 7)))
        return stream_pb2.Frame(encoded=stream_pb2.EncodedImage(encoding=stream_pb2.ENCODING_PNG, data=data))
    data = jpeg_segments(sof(width % 65536, height % 65536))
    return stream_pb2.Frame(encoded=stream_pb2.EncodedImage(encoding=stream_pb2.ENCODING_JPEG, data=data))


def _decodes_or_refuses(frame: stream_pb2.Frame) -> None:
    try:
        pixels = decode_frame(frame, limits=LIMITS)
    except FrameError:
        return  # refused with a reason; any other exception fails the test
    assert pixels.ndim in (2, 3) and pixels.shape[0] * pixels.shape[1] <= LIMITS.max_pixels
    if pixels.dtype == np.float32:
        assert np.isfinite(pixels).all()


@DECODING
@given(mutated_image())
def test_mutated_images_decode_or_are_refused(frame: stream_pb2.Frame) -> None:
    _decodes_or_refuses(frame)


@DECODING
@given(raw_frame())
def test_raw_frames_decode_or_are_refused(frame: stream_pb2.Frame) -> None:
    _decodes_or_refuses(frame)


@DECODING
@given(header_bomb())
def test_declared_sizes_are_judged_before_decoding(frame: stream_pb2.Frame) -> None:
    _decodes_or_refuses(frame)


@DECODING
@given(st.binary(max_size=512), st.sampled_from([stream_pb2.ENCODING_PNG, stream_pb2.ENCODING_JPEG]))
def test_arbitrary_bytes_under_either_label(data: bytes, encoding: stream_pb2.Encoding.ValueType) -> None:
    _decodes_or_refuses(stream_pb2.Frame(encoded=stream_pb2.EncodedImage(encoding=encoding, data=data)))


# -- the servicer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


ANSWERS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


def _call(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@SERVING
@given(st.one_of(mutated_image(), raw_frame(), header_bomb()), st.sampled_from(["", "lesion-unet", "nope"]))
def test_infer_answers_ok_or_a_documented_error(channel: grpc.Channel, frame: stream_pb2.Frame, model: str) -> None:
    frame.model = model
    code, details = _call(lambda: stream_pb2_grpc.StreamServiceStub(channel).Infer(frame, timeout=30))
    assert code in ANSWERS | {grpc.StatusCode.OK}, (code, details)


@SERVING
@given(
    st.sampled_from(["Infer", "GetModel", "LoadModel", "UnloadModel", "RegisterSharedMemory", "ListModels"]),
    st.binary(max_size=256),
)
def test_arbitrary_request_bytes_never_end_unknown(channel: grpc.Channel, method: str, payload: bytes) -> None:
    call = channel.unary_unary(f"/edgescope.v1.StreamService/{method}")
    code, details = _call(lambda: call(payload, timeout=30))
    assert code in ANSWERS | {grpc.StatusCode.OK}, (method, code, details)


@SERVING
@given(st.lists(st.one_of(mutated_image(), raw_frame()), min_size=1, max_size=6))
def test_a_stream_of_fuzzed_frames_answers_each_in_order(channel: grpc.Channel, frames: list[stream_pb2.Frame]) -> None:
    for seq, frame in enumerate(frames):
        frame.stream_id, frame.seq, frame.model = "fuzz", seq, "lesion-unet"
    results = list(stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(frames), timeout=60))
    assert [r.seq for r in results] == list(range(len(frames)))
    for result in results:
        assert result.status.code in (stream_pb2.FRAME_STATUS_CODE_OK, stream_pb2.FRAME_STATUS_CODE_ERROR)
        assert not result.status.reason.startswith("internal error"), result.status.reason
