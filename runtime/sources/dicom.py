"""DICOM single- and multi-frame images (cine loops) as a frame source.

Frames are decoded one at a time from the file with pydicom, so a long cine
never has to be in memory at once. What a frame holds:

* MONOCHROME1/2: ``(H, W)`` stored values, uint8 for 8-bit data, uint16 for
  16-bit data, every pixel as stored. Signed data is shifted by
  ``2**(BitsStored - 1)`` into the unsigned range (the order of values is
  kept, no value is lost). Each frame carries a ``PixelTransform`` with what
  turns stored values into modality values and grey levels (the shift,
  BitsStored, Rescale Slope/Intercept or the Modality LUT Sequence, every
  window and VOI LUT, MONOCHROME1), taken from the per-frame and shared
  functional groups of enhanced multi-frame objects where they give them.
  The server applies the part the model's manifest asks for
  (``edgescope.runtime.pipeline.intensity``); the overlay shows the
  presentation. ``voi`` picks the window or VOI LUT by position or
  explanation (default: the first).
* RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT: ``(H, W, 3)`` RGB uint8.
  Samples of more than 8 bits are shifted down to 8 bits.
* PALETTE COLOR: the palette is applied, giving ``(H, W, 3)`` RGB uint8;
  16-bit palette entries are reduced to their high byte, since displays and
  models take 8-bit colour.

Pixel data of more than 16 bits, bit-packed (1-bit) and floating-point pixel
data are refused with :class:`~edgescope.errors.SourceError`.

Timing: ``fps`` comes from Frame Time (0018,1063), else the mean of Frame
Time Vector (0018,1065), else Cine Rate (0018,0040), else Recommended Display
Frame Rate (0008,2144), else 30 fps (the usual cine rate of ultrasound and
endoscopy, so a file without timing still streams at a realistic pace).
Per-frame timestamps accumulate the Frame Time Vector when there is one and
are ``index / fps`` otherwise.

Calibration: the ultrasound regions calibrated in cm, each with its own
spacing; else the whole frame with the functional groups' or the file's Pixel
Spacing, else Imager Pixel Spacing (see ``dicom_attributes``). ``spacing_mm``
is the frame-wide spacing when all regions agree on one, else None.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import UID

from edgescope.errors import SourceError
from edgescope.runtime.sources.base import PixelArray, SourceFrame, SourceKind
from edgescope.runtime.sources.dicom_attributes import (
    calibrated_regions,
    frame_groups,
    frame_spacing,
    pixel_transform,
    voi_choice,
)
from edgescope.v1 import stream_pb2

__all__ = ["DEFAULT_FPS", "DicomCineSource", "kind_for_modality"]

DEFAULT_FPS = 30.0
"""Frame rate assumed when a file carries no timing attribute."""

# Values larger than this stay on disk when the header is read; in practice
# only Pixel Data is, which is then decoded frame by frame.
_DEFER_SIZE = "1 MB"

_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
# Photometric interpretations that pydicom's decoders deliver as RGB.
_COLOR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_PALETTE = "PALETTE COLOR"

_KIND_BY_MODALITY: dict[str, SourceKind] = {
    "US": "ultrasound",
    "IVUS": "ultrasound",
    "XA": "fluoroscopy",
    "RF": "fluoroscopy",
    "RG": "fluoroscopy",
    "CR": "fluoroscopy",
    "DX": "fluoroscopy",
    "ES": "endoscopy",
    # External-camera photography: intraoperative cameras, handled like scopes.
    "XC": "endoscopy",
    "SM": "microscope",
    "GM": "microscope",
}

FrameArray = npt.NDArray[Any]


def kind_for_modality(modality: str | None) -> SourceKind:
    """The source kind a DICOM Modality (0008,0060) value stands for."""
    return _KIND_BY_MODALITY.get((modality or "").strip().upper(), "other")


class DicomCineSource:
    """Frames of one DICOM file, in order; endless when ``loop`` is true.

    ``index`` and ``timestamp_s`` keep increasing across loops (each pass
    starts one frame interval after the previous pass's last frame), so
    pacing by timestamp works for looped playback too.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        loop: bool = False,
        kind: SourceKind | None = None,
        voi: str = "",
    ) -> None:
        self._path = Path(path)
        header = _read_header(self._path)
        syntax = _transfer_syntax(header, self._path)
        _check_decoder(syntax, self._path)
        self._format = _PixelFormat.from_dataset(header, self._path)
        self._n_frames = _frame_count(header, self._path)
        self._fps, self._timestamps = _timing(header, self._n_frames)
        groups = frame_groups(header, self._n_frames)
        # One entry for the whole file, or one per frame where functional groups give them.
        per_frame: list[Dataset | None] = list(groups) if groups is not None else [None]
        self._regions = [calibrated_regions(header, group) for group in per_frame]
        self._transforms: list[stream_pb2.PixelTransform | None] = [
            pixel_transform(header, group, self._path) if self._format.photometric in _MONOCHROME else None
            for group in per_frame
        ]
        if voi:
            for transform in self._transforms:
                if transform is None:
                    raise SourceError(f"{self._path}: a window or VOI LUT applies to monochrome images only")
                transform.selected_voi = voi_choice(transform, voi, self._path)
        self._spacing_mm = frame_spacing(self._regions[0])
        self._kind: SourceKind = kind if kind is not None else kind_for_modality(header.get("Modality"))
        self._loop = loop
        # pydicom reads frames straight from a path only when the file is not
        # deflated; a deflated file is inflated into memory once, here.
        self._pixel_source: Path | Dataset = (
            _read_dataset(self._path, defer_size=None) if syntax.is_deflated else self._path
        )
        self._active: set[Generator[FrameArray, None, None]] = set()
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    @property
    def kind(self) -> SourceKind:
        return self._kind

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def n_frames(self) -> int:
        """Frames in the file (one pass of a looped source)."""
        return self._n_frames

    @property
    def spacing_mm(self) -> tuple[float, float] | None:
        """(row, column) pixel spacing in mm, or None when the file does not say."""
        return self._spacing_mm

    @property
    def stored_value_offset(self) -> int:
        """What was added to every stored value of signed monochrome data (else 0)."""
        return self._format.offset

    @property
    def regions(self) -> tuple[stream_pb2.CalibratedRegion, ...]:
        """The first frame's calibrated regions (see the module docstring)."""
        return self._regions[0]

    def __iter__(self) -> Iterator[SourceFrame]:
        if self._closed:
            raise SourceError(f"DICOM source {self._path} is closed")
        period = self._timestamps[-1] + 1.0 / self._fps
        index = 0
        start = 0.0
        while not self._closed:
            frames = self._decode()
            self._active.add(frames)
            first_of_pass = index
            try:
                for position, raw in enumerate(frames):
                    regions = self._regions[min(position, len(self._regions) - 1)]
                    yield SourceFrame(
                        index=index,
                        pixels=self._convert(raw, position),
                        timestamp_s=start + self._timestamps[position],
                        spacing_mm=frame_spacing(regions),
                        regions=regions,
                        pixel_transform=self._transforms[min(position, len(self._transforms) - 1)],
                    )
                    index += 1
            finally:
                self._active.discard(frames)
                frames.close()
            if index == first_of_pass and not self._closed:
                raise SourceError(f"{self._path}: no frame could be decoded")
            if not self._loop:
                return
            start += period

    def close(self) -> None:
        """Stop iteration and release the open file."""
        self._closed = True
        for frames in list(self._active):
            frames.close()

    def __enter__(self) -> DicomCineSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _decode(self) -> Generator[FrameArray, None, None]:
        try:
            # 8-bit YBR_FULL(_422) stays YCbCr here: OpenCV converts it to RGB in a fraction of
            # pydicom's time (the same formula; results within 1 grey level).
            yield from iter_pixels(self._pixel_source, as_rgb=not self._format.ycbcr)
        # pydicom's decoding plugins raise many exception types; all mean the
        # same thing here: the file's pixel data cannot be read.
        except Exception as exc:
            raise SourceError(f"{self._path}: cannot decode pixel data: {exc}") from exc

    def _convert(self, raw: FrameArray, position: int) -> PixelArray:
        try:
            return self._format.convert(raw)
        except (ValueError, IndexError) as exc:
            raise SourceError(f"{self._path}: frame {position} has unexpected pixel data: {exc}") from exc


def _read_dataset(path: Path, *, defer_size: str | None) -> Dataset:
    if not path.is_file():
        raise SourceError(f"DICOM file not found: {path}")
    try:
        return pydicom.dcmread(path, defer_size=defer_size)
    except InvalidDicomError as exc:
        raise SourceError(
            f"{path} is not a DICOM file (no 'DICM' file header); "
            "give a DICOM Part 10 file, or use 'video:PATH' for video files"
        ) from exc
    except (OSError, ValueError, EOFError) as exc:
        raise SourceError(f"cannot read DICOM file {path}: {exc}") from exc


def _read_header(path: Path) -> Dataset:
    ds = _read_dataset(path, defer_size=_DEFER_SIZE)
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise SourceError(f"{path}: floating-point pixel data is not supported; frames are 8- or 16-bit")
        raise SourceError(f"{path} has no pixel data (it is not an image; SOP class {ds.get('SOPClassUID', '?')})")
    return ds


def _transfer_syntax(ds: Dataset, path: Path) -> UID:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        raise SourceError(f"{path} has no Transfer Syntax UID in its file meta information")
    return UID(syntax)


def _check_decoder(syntax: UID, path: Path) -> None:
    """Refuse at open, not mid-stream, when no installed package can decode the file."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise SourceError(f"{path}: pixel data in '{syntax.name}' cannot be decoded by pydicom") from exc
    if decoder.is_available:
        return
    missing = decoder.missing_dependencies
    hint = "; ".join(missing)
    if any(item.startswith("pillow") for item in missing):
        hint = f"pip install pillow (or edgescope[demo]), or one of: {hint}"
    raise SourceError(f"{path}: no decoder for '{syntax.name}' pixel data is installed: {hint}")


def _frame_count(ds: Dataset, path: Path) -> int:
    try:
        count = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise SourceError(f"{path}: invalid Number of Frames {ds.get('NumberOfFrames')!r}") from exc
    if count < 1:
        raise SourceError(f"{path}: Number of Frames is {count}")
    return count


@dataclass(frozen=True, slots=True)
class _PixelFormat:
    """How decoded frames of one file become SourceFrame pixels."""

    photometric: str
    bits_stored: int
    dtype: type[np.unsignedinteger[Any]]
    offset: int
    palette: npt.NDArray[np.uint8] | None

    @property
    def ycbcr(self) -> bool:
        """Full-range YCbCr (JPEG's) in 8 bits, converted to RGB here rather than by pydicom."""
        return self.photometric in ("YBR_FULL", "YBR_FULL_422") and self.bits_stored == 8

    @classmethod
    def from_dataset(cls, ds: Dataset, path: Path) -> _PixelFormat:
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        samples = int(ds.get("SamplesPerPixel", 1))
        allocated = int(ds.get("BitsAllocated", 0))
        stored = int(ds.get("BitsStored", allocated))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        if allocated not in (8, 16) or not 1 <= stored <= allocated:
            raise SourceError(
                f"{path}: {allocated}-bit pixel data (Bits Stored {stored}) is not supported; frames are 8- or 16-bit"
            )
        expected_samples = 3 if photometric in _COLOR else 1
        if photometric not in _MONOCHROME | _COLOR | {_PALETTE}:
            raise SourceError(f"{path}: photometric interpretation {photometric!r} is not supported")
        if samples != expected_samples:
            raise SourceError(f"{path}: {photometric} with {samples} samples per pixel is not valid")
        if signed and photometric not in _MONOCHROME:
            raise SourceError(f"{path}: signed {photometric} pixel data is not valid")
        dtype = np.uint8 if allocated == 8 else np.uint16
        return cls(
            photometric=photometric,
            bits_stored=stored,
            dtype=dtype,
            offset=1 << (stored - 1) if signed else 0,
            palette=_palette_table(ds, allocated, path) if photometric == _PALETTE else None,
        )

    def convert(self, raw: FrameArray) -> PixelArray:
        if self.palette is not None:
            return self.palette[raw]
        if self.ycbcr:
            ycrcb = np.ascontiguousarray(raw[..., [0, 2, 1]], dtype=np.uint8)
            return np.asarray(cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB), dtype=np.uint8)
        top = (1 << self.bits_stored) - 1
        if self.photometric in _COLOR:
            # Clip first: bits above Bits Stored may hold anything (overlays).
            shift = max(self.bits_stored - 8, 0)
            return np.ascontiguousarray(np.minimum(raw, top) >> shift, dtype=np.uint8)
        if self.offset:
            # Stored values as the transform expects them; MONOCHROME1 is inverted for display, not here.
            return np.ascontiguousarray(np.clip(raw.astype(np.int32) + self.offset, 0, top), dtype=self.dtype)
        return np.ascontiguousarray(raw, dtype=self.dtype)


def _palette_table(ds: Dataset, bits_allocated: int, path: Path) -> npt.NDArray[np.uint8]:
    """RGB uint8 for every possible stored value, so a frame is one table lookup."""
    indices = np.arange(1 << bits_allocated, dtype=np.uint8 if bits_allocated == 8 else np.uint16)
    try:
        table = apply_color_lut(indices, ds)[..., :3]
    except (ValueError, KeyError, AttributeError) as exc:
        raise SourceError(f"{path}: unreadable palette colour lookup table: {exc}") from exc
    if table.dtype == np.uint8:
        return np.ascontiguousarray(table)
    # Some writers declare 16-bit entries but store 8-bit values in them.
    if int(table.max()) <= 0xFF:
        return table.astype(np.uint8)
    return (table >> 8).astype(np.uint8)


def _positive(value: Any) -> float | None:
    """``value`` as a finite positive float, or None when absent or unusable."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _timing(ds: Dataset, n_frames: int) -> tuple[float, list[float]]:
    """Frame rate and each frame's timestamp (s) relative to the first frame."""
    increments_ms = _frame_time_vector(ds, n_frames)
    frame_time_ms = _positive(ds.get("FrameTime"))
    # Every candidate is positive when present, so `or` picks the first one given.
    fps = (
        (1000.0 / frame_time_ms if frame_time_ms else None)
        or _vector_fps(increments_ms)
        or _positive(ds.get("CineRate"))
        or _positive(ds.get("RecommendedDisplayFrameRate"))
        or DEFAULT_FPS
    )
    if increments_ms is None:
        return fps, [i / fps for i in range(n_frames)]
    # The first increment is 0 by definition; subtract it anyway so frame 0 is at 0.
    cumulative = np.cumsum(increments_ms) - increments_ms[0]
    return fps, [float(ms) / 1000.0 for ms in cumulative]


def _frame_time_vector(ds: Dataset, n_frames: int) -> list[float] | None:
    """Frame Time Vector in ms, when usable: one increment per frame, none negative."""
    vector = ds.get("FrameTimeVector")
    if vector is None:
        return None
    try:
        values = [float(v) for v in (vector if isinstance(vector, MultiValue) else [vector])]
    except (TypeError, ValueError):
        return None
    if len(values) != n_frames or any(not math.isfinite(v) or v < 0 for v in values):
        return None
    return values


def _vector_fps(increments_ms: list[float] | None) -> float | None:
    if increments_ms is None or len(increments_ms) < 2:
        return None
    total = sum(increments_ms[1:])
    return 1000.0 * (len(increments_ms) - 1) / total if total > 0 else None
