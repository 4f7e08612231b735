"""What a PNG or JPEG declares in its header, read without decoding any pixels.

A 260 KB PNG can declare 16384 x 16384 pixels: decoding it first and checking
its size after costs gigabytes. The frame decoder reads the declared size,
bit depth and channels here, checks them against its budget, and only then
decodes. The encoding is recognised by its magic bytes, so a TIFF or PFM
labelled PNG never reaches another codec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from edgescope.errors import FrameError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# Progressive JPEGs use about 10 scans; thousands are a decoding-time bomb.
MAX_JPEG_SCANS = 64

# PNG colour type -> channels as decoded (palette expands to RGB).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); not DHT, JPG, DAC.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOS = 0xDA
_EOI = 0xD9
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xD9)}


@dataclass(frozen=True, slots=True)
class ImageHeader:
    width: int
    height: int
    channels: int
    bits: int


def sniff(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or None, from the magic bytes."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def png_header(data: bytes) -> ImageHeader:
    """Size, channels and bit depth from the IHDR chunk, which the PNG standard puts first."""
    if len(data) < 33 or data[12:16] != b"IHDR" or struct.unpack(">I", data[8:12])[0] != 13:
        raise FrameError("encoded image could not be decoded as PNG (corrupt or truncated header)")
    width, height, bits, color_type = struct.unpack(">IIBB", data[16:26])
    if color_type not in _PNG_CHANNELS or bits not in _PNG_DEPTHS[color_type]:
        raise FrameError(
            f"encoded image could not be decoded as PNG (corrupt header: colour type {color_type}, bit depth {bits})"
        )
    return ImageHeader(width, height, _PNG_CHANNELS[color_type], bits)


def jpeg_header(data: bytes) -> ImageHeader:
    """Size, components and precision from the start-of-frame segment; also counts the scans."""
    header: ImageHeader | None = None
    scans = 0
    position = 2
    end = len(data)
    while position < end:
        if data[position] != 0xFF:
            raise FrameError("encoded image could not be decoded as JPEG (corrupt marker structure)")
        while position < end and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= end:
            break
        marker = data[position]
        position += 1
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            continue
        if position + 2 > end:
            break
        length = struct.unpack(">H", data[position : position + 2])[0]
        if length < 2:
            raise FrameError("encoded image could not be decoded as JPEG (corrupt segment length)")
        segment = data[position + 2 : position + length]
        position += length
        if marker in _SOF and header is None:
            if len(segment) < 6:
                break
            bits, height, width, components = struct.unpack(">BHHB", segment[:6])
            header = ImageHeader(width, height, components, bits)
        elif marker == _SOS:
            if header is None:
                raise FrameError("encoded image could not be decoded as JPEG (a scan before the frame header)")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise FrameError(f"JPEG has more than {MAX_JPEG_SCANS} scans; refused")
            position = _after_entropy_data(data, position)
    if header is None:
        raise FrameError("encoded image could not be decoded as JPEG (corrupt or truncated: no frame header)")
    if header.height == 0:
        raise FrameError("JPEG declares its height later in the stream (DNL); not supported")
    return header


def _after_entropy_data(data: bytes, position: int) -> int:
    """Skip a scan's entropy-coded bytes: up to the next marker that is not stuffing or a restart."""
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return len(data)
        following = data[position + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            position += 1
            continue
        return position
