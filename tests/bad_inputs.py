"""Malformed inputs of every kind, built in code: frames, encoded images, KServe requests, names."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from edgescope.kserve.v2 import inference_pb2 as kserve_pb2
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.v1 import manifest_pb2, stream_pb2

MODEL = "lesion-unet"
HUGE_NAME = "m" * (1 << 20)
UINT8 = manifest_pb2.DATA_TYPE_UINT8
FLOAT32 = manifest_pb2.DATA_TYPE_FLOAT32
GRAY = stream_pb2.PIXEL_FORMAT_GRAY
RGB = stream_pb2.PIXEL_FORMAT_RGB
BGR = stream_pb2.PIXEL_FORMAT_BGR
PNG = stream_pb2.ENCODING_PNG
JPEG = stream_pb2.ENCODING_JPEG


def good_pixels() -> np.ndarray:
    return np.full((48, 64), 90, dtype=np.uint8)


def raw(width: int = 64, height: int = 48, channels: int = 1, dtype: int = UINT8, fmt: int = GRAY,
        data: bytes | None = None) -> stream_pb2.RawImage:  # fmt: skip
    size = width * height * channels * (4 if dtype == FLOAT32 else 1)
    return stream_pb2.RawImage(
        width=width,
        height=height,
        channels=channels,
        dtype=dtype,
        format=fmt,
        data=bytes(size) if data is None else data,
    )


def float_frame(value: float) -> stream_pb2.RawImage:
    pixels = np.zeros((48, 64), dtype=np.float32)
    pixels[7, 9] = value
    return raw(dtype=FLOAT32, data=pixels.tobytes())


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_with_header(width: int, height: int, bits: int = 8, color_type: int = 0, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR says what it likes; ``idat`` may be anything (or a real compressed image)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def encoded(code: int, data: bytes) -> stream_pb2.EncodedImage:
    return stream_pb2.EncodedImage(encoding=code, data=data)  # type: ignore[arg-type]


def image_bytes(extension: str, pixels: np.ndarray | None = None) -> bytes:
    ok, data = cv2.imencode(extension, good_pixels() if pixels is None else pixels)
    assert ok
    return bytes(data.tobytes())


def jpeg_segments(*segments: bytes) -> bytes:
    return b"\xff\xd8" + b"".join(segments) + b"\xff\xd9"


def sof(width: int, height: int) -> bytes:
    return b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"


SOS = b"\xff\xda" + struct.pack(">H", 8) + b"\x01\x01\x00\x00\x3f\x00" + b"\x12\x34"


def frame_cases() -> dict[str, tuple[stream_pb2.Frame, str]]:
    """Frame kind -> (frame, a phrase its error must contain)."""
    pfm = image_bytes(".pfm", np.zeros((8, 8), dtype=np.float32))
    png = image_bytes(".png")
    jpeg = image_bytes(".jpg")
    cases: dict[str, tuple[stream_pb2.Frame, str]] = {
        "no pixels": (stream_pb2.Frame(), "no pixels"),
        "raw width 0": (stream_pb2.Frame(raw=raw(width=0)), "empty"),
        "raw height 0": (stream_pb2.Frame(raw=raw(height=0)), "empty"),
        "raw side over 16384": (stream_pb2.Frame(raw=raw(width=20000, height=1, data=b"")), "limit per side"),
        "raw over the pixel budget": (stream_pb2.Frame(raw=raw(width=16384, height=16384, data=b"x")), "budget"),
        "raw data one byte short": (stream_pb2.Frame(raw=raw(data=bytes(64 * 48 - 1))), "needs"),
        "raw data one byte long": (stream_pb2.Frame(raw=raw(data=bytes(64 * 48 + 1))), "needs"),
        "raw empty data": (stream_pb2.Frame(raw=raw(data=b"")), "needs"),
        "raw dtype INT64": (stream_pb2.Frame(raw=raw(dtype=manifest_pb2.DATA_TYPE_INT64)), "not supported"),
        "raw dtype FLOAT16": (stream_pb2.Frame(raw=raw(dtype=manifest_pb2.DATA_TYPE_FLOAT16)), "not supported"),
        "raw dtype unknown enum": (stream_pb2.Frame(raw=raw(dtype=99)), "not supported"),
        "raw dtype unspecified": (stream_pb2.Frame(raw=raw(dtype=0)), "not supported"),
        "raw format unspecified": (stream_pb2.Frame(raw=raw(fmt=0)), "GRAY, RGB, BGR or CHANNELS"),
        "raw format unknown enum": (stream_pb2.Frame(raw=raw(fmt=42)), "GRAY, RGB, BGR or CHANNELS"),
        "raw GRAY with 3 channels": (stream_pb2.Frame(raw=raw(channels=3)), "channel"),
        "raw RGB with 1 channel": (stream_pb2.Frame(raw=raw(fmt=RGB)), "channel"),
        "raw BGR with 4 channels": (stream_pb2.Frame(raw=raw(fmt=BGR, channels=4)), "channel"),
        "raw channels 0": (stream_pb2.Frame(raw=raw(channels=0)), "channel"),
        "float NaN pixel": (stream_pb2.Frame(raw=float_frame(float("nan"))), "NaN"),
        "float +inf pixel": (stream_pb2.Frame(raw=float_frame(float("inf"))), "infinite"),
        "float -inf pixel": (stream_pb2.Frame(raw=float_frame(float("-inf"))), "infinite"),
        "encoding unspecified": (stream_pb2.Frame(encoded=encoded(0, png)), "PNG or JPEG"),
        "encoding unknown enum": (stream_pb2.Frame(encoded=encoded(9, png)), "PNG or JPEG"),
        "empty PNG": (stream_pb2.Frame(encoded=encoded(PNG, b"")), "empty"),
        "empty JPEG": (stream_pb2.Frame(encoded=encoded(JPEG, b"")), "empty"),
        "JPEG labelled PNG": (stream_pb2.Frame(encoded=encoded(PNG, jpeg)), "holds JPEG"),
        "PNG labelled JPEG": (stream_pb2.Frame(encoded=encoded(JPEG, png)), "holds PNG"),
        "TIFF labelled PNG": (stream_pb2.Frame(encoded=encoded(PNG, image_bytes(".tiff"))), "neither"),
        "PFM labelled PNG": (stream_pb2.Frame(encoded=encoded(PNG, pfm)), "neither"),
        "PFM labelled JPEG": (stream_pb2.Frame(encoded=encoded(JPEG, pfm)), "neither"),
        "BMP labelled JPEG": (stream_pb2.Frame(encoded=encoded(JPEG, image_bytes(".bmp"))), "neither"),
        "PGM labelled PNG": (stream_pb2.Frame(encoded=encoded(PNG, image_bytes(".pgm"))), "neither"),
        "text labelled PNG": (stream_pb2.Frame(encoded=encoded(PNG, b"not a png at all")), "neither"),
        "PNG magic then garbage": (stream_pb2.Frame(encoded=encoded(PNG, b"\x89PNG\r\n\x1a\n garbage")), "corrupt"),
        "PNG truncated in IHDR": (stream_pb2.Frame(encoded=encoded(PNG, png[:20])), "corrupt"),
        "PNG bad colour type": (stream_pb2.Frame(encoded=encoded(PNG, png_with_header(8, 8, 8, 5))), "colour type"),
        "PNG bad bit depth": (stream_pb2.Frame(encoded=encoded(PNG, png_with_header(8, 8, 7, 0))), "bit depth"),
        "PNG declares 16384x16384": (
            stream_pb2.Frame(encoded=encoded(PNG, png_with_header(16384, 16384))),
            "budget",
        ),
        "PNG declares 2^31 wide": (stream_pb2.Frame(encoded=encoded(PNG, png_with_header(2**31, 1))), "limit per side"),
        "PNG declares width 0": (stream_pb2.Frame(encoded=encoded(PNG, png_with_header(0, 8))), "empty"),
        "PNG with a corrupt IDAT": (
            stream_pb2.Frame(encoded=encoded(PNG, png_with_header(8, 8, idat=b"\x00garbage"))),
            "could not be decoded",
        ),
        "PNG cut in its data": (stream_pb2.Frame(encoded=encoded(PNG, png[: len(png) // 2])), "could not be decoded"),
        "JPEG magic only": (stream_pb2.Frame(encoded=encoded(JPEG, b"\xff\xd8\xff")), "could not be decoded"),
        "JPEG garbage after magic": (stream_pb2.Frame(encoded=encoded(JPEG, b"\xff\xd8\xff\xe0\x00")), "decoded"),
        "JPEG cut after its header": (stream_pb2.Frame(encoded=encoded(JPEG, jpeg[:200])), "could not be decoded"),
        "JPEG with 100 scans": (
            stream_pb2.Frame(encoded=encoded(JPEG, jpeg_segments(sof(8, 8), *[SOS] * 100))),
            "scans",
        ),
        "JPEG scan before frame header": (stream_pb2.Frame(encoded=encoded(JPEG, jpeg_segments(SOS))), "before"),
        "JPEG height in DNL": (stream_pb2.Frame(encoded=encoded(JPEG, jpeg_segments(sof(8, 0), SOS))), "DNL"),
        "JPEG declares 65535x65535": (
            stream_pb2.Frame(encoded=encoded(JPEG, jpeg_segments(sof(65535, 65535), SOS))),
            "limit per side",
        ),
        "JPEG declares 12000x12000": (
            stream_pb2.Frame(encoded=encoded(JPEG, jpeg_segments(sof(12000, 12000), SOS))),
            "budget",
        ),
        "JPEG segment length 1": (stream_pb2.Frame(encoded=encoded(JPEG, b"\xff\xd8\xff\xe0\x00\x01")), "length"),
        "JPEG bytes between markers": (
            stream_pb2.Frame(encoded=encoded(JPEG, b"\xff\xd8\xff\xe0\x00\x04\x00\x00\x12\x34")),
            "marker",
        ),
        "unknown model": (stream_pb2.Frame(model="no-such-model", raw=encode_raw(good_pixels())), "not loaded"),
        "1 MB model name": (stream_pb2.Frame(model=HUGE_NAME, raw=encode_raw(good_pixels())), "at most 128"),
        "1 MB extra model name": (
            stream_pb2.Frame(raw=encode_raw(good_pixels()), extra_models=[HUGE_NAME]),
            "at most 128",
        ),
        "1 MB region name": (
            stream_pb2.Frame(raw=encode_raw(good_pixels()), regions=[stream_pb2.CalibratedRegion(name=HUGE_NAME)]),
            "at most 128",
        ),
        "1,000 calibrated regions": (
            stream_pb2.Frame(raw=encode_raw(good_pixels()), regions=[stream_pb2.CalibratedRegion()] * 1000),
            "at most 16",
        ),
        "1 MB VOI explanation": (
            stream_pb2.Frame(
                raw=encode_raw(good_pixels()),
                pixel_transform=stream_pb2.PixelTransform(voi=[stream_pb2.Voi(explanation=HUGE_NAME)]),
            ),
            "at most 128",
        ),
        "extra_models over the cap": (
            stream_pb2.Frame(raw=encode_raw(good_pixels()), extra_models=[MODEL] * 100),
            "at most",
        ),
        "extra_models repeated": (
            stream_pb2.Frame(raw=encode_raw(good_pixels()), extra_models=[MODEL, MODEL]),
            "more than once",
        ),
        "extra_models unknown": (
            stream_pb2.Frame(raw=encode_raw(good_pixels()), extra_models=["nope"]),
            "not loaded",
        ),
        "shm region not registered": (
            stream_pb2.Frame(shm=stream_pb2.SharedMemoryFrame(region="not-registered", size=10, image=raw(data=b""))),
            "not registered",
        ),
        "shm region '..'": (
            stream_pb2.Frame(shm=stream_pb2.SharedMemoryFrame(region="..", size=10, image=raw(data=b""))),
            "not registered",
        ),
        "shm region 1 MB name": (
            stream_pb2.Frame(shm=stream_pb2.SharedMemoryFrame(region=HUGE_NAME, size=10, image=raw(data=b""))),
            "at most 128",
        ),
    }
    return cases


def infer_input(name: str, datatype: str, shape: list[int]) -> kserve_pb2.ModelInferRequest.InferInputTensor:
    return kserve_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


def kserve_cases(input_name: str) -> dict[str, tuple[kserve_pb2.ModelInferRequest, str]]:
    """KServe request kind -> (request, the status code name it must get)."""
    image = np.zeros((1, 1, 256, 256), dtype=np.float32).tobytes()

    def request(*inputs: kserve_pb2.ModelInferRequest.InferInputTensor, raw_contents: list[bytes] | None = None,
                model: str = MODEL, **fields: object) -> kserve_pb2.ModelInferRequest:  # fmt: skip
        message = kserve_pb2.ModelInferRequest(model_name=model, inputs=list(inputs), **fields)  # type: ignore[arg-type]
        message.raw_input_contents.extend(raw_contents or [])
        return message

    good = infer_input(input_name, "FP32", [1, 1, 256, 256])
    typed = infer_input(input_name, "FP32", [1, 1, 2, 2])
    typed.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    uint8_over = infer_input(input_name, "UINT8", [1, 1, 1, 1])
    uint8_over.contents.uint_contents.extend([300])
    fp16_typed = infer_input(input_name, "FP16", [1])
    big = 2**62
    return {
        "no model name": (request(good, raw_contents=[image], model=""), "NOT_FOUND"),
        "unknown model": (request(good, raw_contents=[image], model="nope"), "NOT_FOUND"),
        "1 MB model name": (request(good, raw_contents=[image], model=HUGE_NAME), "NOT_FOUND"),
        "version mismatch": (request(good, raw_contents=[image], model_version="99"), "NOT_FOUND"),
        "no inputs": (request(), "INVALID_ARGUMENT"),
        "unknown datatype": (
            request(infer_input(input_name, "FP128", [1]), raw_contents=[b"\0" * 16]),
            "INVALID_ARGUMENT",
        ),
        "BYTES datatype": (
            request(infer_input(input_name, "BYTES", [1]), raw_contents=[b"\0" * 8]),
            "INVALID_ARGUMENT",
        ),
        "negative dimension": (
            request(infer_input(input_name, "FP32", [-1, 4]), raw_contents=[b""]),
            "INVALID_ARGUMENT",
        ),
        "shape product overflows int64": (
            request(infer_input(input_name, "FP32", [big, big, big]), raw_contents=[b""]),
            "INVALID_ARGUMENT",
        ),
        "shape of 2^40 elements": (
            request(infer_input(input_name, "FP32", [2**20, 2**20]), raw_contents=[b""]),
            "INVALID_ARGUMENT",
        ),
        "nine dimensions": (
            request(infer_input(input_name, "FP32", [1] * 9), raw_contents=[b"\0" * 4]),
            "INVALID_ARGUMENT",
        ),
        "batch over the cap": (
            request(infer_input(input_name, "FP32", [17, 1, 256, 256]), raw_contents=[bytes(17 * 256 * 256 * 4)]),
            "INVALID_ARGUMENT",
        ),
        "raw contents one byte short": (request(good, raw_contents=[image[:-1]]), "INVALID_ARGUMENT"),
        "raw contents for two inputs, one given": (request(good, raw_contents=[image, image]), "INVALID_ARGUMENT"),
        "typed contents count wrong": (request(typed), "INVALID_ARGUMENT"),
        "typed UINT8 value 300": (request(uint8_over), "INVALID_ARGUMENT"),
        "typed FP16": (request(fp16_typed), "INVALID_ARGUMENT"),
        "no contents at all": (request(good), "INVALID_ARGUMENT"),
        "wrong input name": (
            request(infer_input("nope", "FP32", [1, 1, 256, 256]), raw_contents=[image]),
            "INVALID_ARGUMENT",
        ),
        "wrong datatype": (
            request(infer_input(input_name, "INT32", [1, 1, 256, 256]), raw_contents=[image]),
            "INVALID_ARGUMENT",
        ),
        "wrong shape": (
            request(infer_input(input_name, "FP32", [1, 1, 128, 512]), raw_contents=[image]),
            "INVALID_ARGUMENT",
        ),
        "wrong rank": (request(infer_input(input_name, "FP32", [256, 256]), raw_contents=[image]), "INVALID_ARGUMENT"),
        "input given twice": (request(good, good, raw_contents=[image, image]), "INVALID_ARGUMENT"),
        "65 inputs": (request(*[good] * 65), "INVALID_ARGUMENT"),
        "unknown requested output": (
            request(
                good, raw_contents=[image], outputs=[kserve_pb2.ModelInferRequest.InferRequestedOutputTensor(name="x")]
            ),
            "INVALID_ARGUMENT",
        ),
    }
