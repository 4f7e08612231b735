"""DicomCineSource against real DICOM files shipped by pydicom and pydicom-data.

Expected values are read from each file with pydicom's own dataset API (or
computed from the raw attributes), not taken from the source under test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import pixel_array
from pydicom.sequence import Sequence

from edgescope.errors import SourceError
from edgescope.runtime.sources import dicom as dicom_module
from edgescope.runtime.sources.dicom import DEFAULT_FPS, DicomCineSource, kind_for_modality


def _data(name: str) -> Path:
    """A test file from pydicom or pydicom-data; never downloads."""
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        pytest.fail(f"{name} not found: the tests need pydicom-data (pip install edgescope[dev])")
    return Path(found)


def _read_all(path: Path) -> list[np.ndarray]:
    with DicomCineSource(path) as source:
        return [frame.pixels for frame in source]


def _us_cm_spacing(ds: Dataset) -> tuple[float, float]:
    """(row, column) mm of the first region calibrated in cm, read straight from the file."""
    region = next(
        r for r in ds.SequenceOfUltrasoundRegions if r.PhysicalUnitsXDirection == 3 and r.PhysicalUnitsYDirection == 3
    )
    return (region.PhysicalDeltaY * 10.0, region.PhysicalDeltaX * 10.0)


def _rewrite(name: str, tmp_path: Path, change: Callable[[Dataset], None]) -> Path:
    """A copy of a test file with some attributes changed."""
    ds = pydicom.dcmread(_data(name))
    change(ds)
    out = tmp_path / f"changed-{name}"
    ds.save_as(out)
    return out


def test_rgb_ultrasound_single_frame() -> None:
    path = _data("US1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "RGB"
    assert not {"FrameTime", "CineRate", "PixelSpacing", "SequenceOfUltrasoundRegions"} & set(ds.dir())
    with DicomCineSource(path) as source:
        assert source.kind == "ultrasound"
        assert source.n_frames == 1
        assert source.fps == DEFAULT_FPS
        assert source.spacing_mm is None
        (frame,) = list(source)
    assert frame.index == 0
    assert frame.timestamp_s == 0.0
    assert frame.spacing_mm is None
    assert frame.pixels.shape == (ds.Rows, ds.Columns, 3)
    assert frame.pixels.dtype == np.uint8
    assert frame.pixels.flags.c_contiguous
    np.testing.assert_array_equal(frame.pixels, ds.pixel_array)


def test_echo_cine_jpeg_baseline_ybr() -> None:
    path = _data("color3d_jpeg_baseline.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    frame_time_ms = float(ds.FrameTime)
    with DicomCineSource(path) as source:
        assert source.kind == "ultrasound"
        assert source.n_frames == int(ds.NumberOfFrames) == 120
        assert source.fps == pytest.approx(1000.0 / frame_time_ms)
        assert source.spacing_mm == pytest.approx(_us_cm_spacing(ds))
        frames = list(source)
    assert [f.index for f in frames] == list(range(120))
    assert [f.timestamp_s for f in frames] == pytest.approx([i * frame_time_ms / 1000.0 for i in range(120)])
    assert all(f.pixels.shape == (ds.Rows, ds.Columns, 3) and f.pixels.dtype == np.uint8 for f in frames)
    for i in (0, 60, 119):
        # OpenCV's YCbCr -> RGB rounds once where pydicom's rounds twice: at most one grey level apart.
        expected = pixel_array(ds, index=i).astype(np.int16)
        assert np.abs(frames[i].pixels.astype(np.int16) - expected).max() <= 1
    # Decoded to RGB, not left as YCbCr: grey B-mode tissue has R = G = B,
    # whereas its chroma channels would sit near 128.
    pixels = frames[60].pixels.astype(np.int16)
    tissue = pixels[..., 0] > 40
    assert tissue.sum() > 10_000
    assert np.abs(pixels[..., 0] - pixels[..., 1])[tissue].mean() < 3
    assert np.abs(pixels[..., 2] - pixels[..., 1])[tissue].mean() < 3


def test_ybr_full_matches_the_rgb_original() -> None:
    # SC_ybr_full_uncompressed.dcm is SC_rgb.dcm (stripes of known colours) converted to YCbCr.
    rgb = _read_all(_data("SC_rgb.dcm"))[0]
    (converted,) = _read_all(_data("SC_ybr_full_uncompressed.dcm"))
    assert converted.dtype == np.uint8
    assert np.abs(converted.astype(int) - rgb.astype(int)).max() <= 6
    np.testing.assert_array_equal(rgb[0, 50], [255, 0, 0])
    np.testing.assert_array_equal(rgb[20, 50], [0, 255, 0])
    np.testing.assert_array_equal(rgb[40, 50], [0, 0, 255])


def test_jpeg2000_ybr_ict_decodes_to_rgb() -> None:
    (decoded,) = _read_all(_data("US1_J2KI.dcm"))
    (reference,) = _read_all(_data("US1_UNCI.dcm"))
    assert decoded.shape == (480, 640, 3)
    assert np.abs(decoded.astype(int) - reference.astype(int)).max() <= 2


def test_palette_8bit_two_frames() -> None:
    path = _data("OBXXXX1A_2frame.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    assert list(ds.RedPaletteColorLookupTableDescriptor) == [256, 0, 16]
    # The 16-bit little-endian palette entries, reduced to 8 bits.
    lut = np.stack(
        [
            np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2") >> 8
            for c in ("Red", "Green", "Blue")
        ],
        axis=-1,
    ).astype(np.uint8)
    with DicomCineSource(path) as source:
        assert source.spacing_mm == pytest.approx(_us_cm_spacing(ds))
        frames = list(source)
    assert len(frames) == int(ds.NumberOfFrames) == 2
    assert [f.timestamp_s for f in frames] == pytest.approx([0.0, 1.0 / DEFAULT_FPS])
    for i, frame in enumerate(frames):
        assert frame.pixels.shape == (600, 800, 3)
        assert frame.pixels.dtype == np.uint8
        np.testing.assert_array_equal(frame.pixels, lut[ds.pixel_array[i]])


def test_palette_16bit_segmented() -> None:
    path = _data("gdcm-US-ALOKA-16.dcm")
    ds = pydicom.dcmread(path)
    assert (ds.PhotometricInterpretation, ds.BitsAllocated) == ("PALETTE COLOR", 16)
    assert "SegmentedRedPaletteColorLookupTableData" in ds
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    with DicomCineSource(path) as source:
        # Two cm-calibrated regions with the same scale, and one uncalibrated.
        assert source.spacing_mm == pytest.approx(_us_cm_spacing(ds))
        (frame,) = list(source)
    assert frame.pixels.dtype == np.uint8
    np.testing.assert_array_equal(frame.pixels, expected)


@pytest.mark.parametrize(("name", "kind"), [("MR_small.dcm", "other"), ("CT_small.dcm", "other")])
def test_signed_16bit_is_offset_into_uint16(name: str, kind: str) -> None:
    path = _data(name)
    ds = pydicom.dcmread(path)
    assert (ds.PixelRepresentation, ds.BitsAllocated, ds.PhotometricInterpretation) == (1, 16, "MONOCHROME2")
    offset = 1 << (ds.BitsStored - 1)
    with DicomCineSource(path) as source:
        assert source.kind == kind
        assert source.stored_value_offset == offset
        assert source.spacing_mm == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
        (frame,) = list(source)
    assert frame.pixels.dtype == np.uint16
    np.testing.assert_array_equal(frame.pixels.astype(np.int32), ds.pixel_array.astype(np.int32) + offset)


def test_unsigned_8bit_monochrome() -> None:
    path = _data("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.PixelRepresentation, ds.SamplesPerPixel) == (8, 0, 1)
    (pixels,) = _read_all(path)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, ds.pixel_array)


def test_monochrome1_keeps_stored_values_and_every_pixel_and_says_invert() -> None:
    path = _data("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    # This file's Pixel Spacing is 0\\0, which means "unknown", not 0 mm.
    assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]
    with DicomCineSource(path) as source:
        assert source.kind == "fluoroscopy"  # CR
        assert source.spacing_mm is None
        assert source.regions == ()
        (frame,) = list(source)
    assert frame.pixels.dtype == np.uint16
    # An odd-sized frame (1955 rows, 1841 columns) keeps every pixel.
    assert frame.pixels.shape == (ds.Rows, ds.Columns) == (1955, 1841)
    np.testing.assert_array_equal(frame.pixels, ds.pixel_array)
    assert frame.pixel_transform is not None
    assert frame.pixel_transform.invert
    assert frame.pixel_transform.bits_stored == ds.BitsStored


def test_rgb_16bit_is_reduced_to_8bit() -> None:
    path = _data("SC_rgb_16bit.dcm")
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.BitsStored) == (16, 16)
    (pixels,) = _read_all(path)
    np.testing.assert_array_equal(pixels, (ds.pixel_array >> 8).astype(np.uint8))


def test_multiframe_without_timing_uses_default_rate() -> None:
    path = _data("emri_small.dcm")
    ds = pydicom.dcmread(path)
    with DicomCineSource(path) as source:
        frames = list(source)
    assert len(frames) == int(ds.NumberOfFrames) == 10
    assert [f.timestamp_s for f in frames] == pytest.approx([i / DEFAULT_FPS for i in range(10)])
    for frame, expected in zip(frames, ds.pixel_array, strict=True):
        np.testing.assert_array_equal(frame.pixels, expected)


def test_deflated_file() -> None:
    path = _data("image_dfl.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_deflated
    (pixels,) = _read_all(path)
    np.testing.assert_array_equal(pixels, ds.pixel_array)


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return change


@pytest.mark.parametrize(
    ("change", "fps"),
    [
        (_set(CineRate=25), 25.0),
        (_set(RecommendedDisplayFrameRate=12), 12.0),
        (_set(FrameTime=20.0, CineRate=25), 50.0),  # Frame Time wins
        (_set(CineRate=25, RecommendedDisplayFrameRate=12), 25.0),
        (_set(FrameTime=0.0), DEFAULT_FPS),  # unusable, ignored
    ],
)
def test_frame_rate_attributes(tmp_path: Path, change: Callable[[Dataset], None], fps: float) -> None:
    with DicomCineSource(_rewrite("emri_small.dcm", tmp_path, change)) as source:
        assert source.fps == pytest.approx(fps)
        timestamps = [f.timestamp_s for f in source]
    assert timestamps == pytest.approx([i / fps for i in range(10)])


def test_frame_time_vector_gives_timestamps(tmp_path: Path) -> None:
    increments = [0.0, 40.0, 40.0, 50.0, 30.0, 40.0, 40.0, 45.0, 35.0, 40.0]
    path = _rewrite("emri_small.dcm", tmp_path, _set(FrameTimeVector=increments))
    with DicomCineSource(path) as source:
        assert source.fps == pytest.approx(1000.0 * 9 / sum(increments))
        timestamps = [f.timestamp_s for f in source]
    assert timestamps == pytest.approx(list(np.cumsum(increments) / 1000.0))


def test_frame_time_vector_of_wrong_length_is_ignored(tmp_path: Path) -> None:
    path = _rewrite("emri_small.dcm", tmp_path, _set(FrameTimeVector=[0.0, 40.0, 40.0]))
    with DicomCineSource(path) as source:
        assert source.fps == DEFAULT_FPS
        assert [f.timestamp_s for f in source] == pytest.approx([i / DEFAULT_FPS for i in range(10)])


def _shared_pixel_measures(ds: Dataset) -> None:
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.25]
    group = Dataset()
    group.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([group])


def _disagreeing_regions(ds: Dataset) -> None:
    ds.SequenceOfUltrasoundRegions[1].PhysicalUnitsXDirection = 3
    ds.SequenceOfUltrasoundRegions[1].PhysicalUnitsYDirection = 3
    ds.SequenceOfUltrasoundRegions[1].PhysicalDeltaY = 0.05


@pytest.mark.parametrize(
    ("name", "change", "spacing"),
    [
        ("emri_small.dcm", _shared_pixel_measures, (0.5, 0.25)),
        ("vlut_04.dcm", _set(ImagerPixelSpacing=[0.2, 0.3]), (0.2, 0.3)),
        ("vlut_04.dcm", _set(PixelSpacing=[0.1, 0.15], ImagerPixelSpacing=[0.2, 0.3]), (0.1, 0.15)),
        ("OBXXXX1A.dcm", _disagreeing_regions, None),
    ],
)
def test_spacing_sources(
    tmp_path: Path, name: str, change: Callable[[Dataset], None], spacing: tuple[float, float] | None
) -> None:
    with DicomCineSource(_rewrite(name, tmp_path, change)) as source:
        assert source.spacing_mm == (pytest.approx(spacing) if spacing else None)
        assert next(iter(source)).spacing_mm == source.spacing_mm


def test_loop_continues_index_and_time() -> None:
    path = _data("OBXXXX1A_2frame.dcm")
    with DicomCineSource(path, loop=True) as source:
        frames = list(itertools.islice(source, 5))
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert [f.timestamp_s for f in frames] == pytest.approx([i / DEFAULT_FPS for i in range(5)])
    np.testing.assert_array_equal(frames[2].pixels, frames[0].pixels)
    np.testing.assert_array_equal(frames[3].pixels, frames[1].pixels)
    assert not np.array_equal(frames[0].pixels, frames[1].pixels)


def test_close_stops_iteration_and_refuses_more() -> None:
    source = DicomCineSource(_data("emri_small.dcm"), loop=True)
    frames = iter(source)
    next(frames)
    source.close()
    assert list(frames) == []
    with pytest.raises(SourceError, match="closed"):
        iter(source).__next__()


def test_kind_override() -> None:
    with DicomCineSource(_data("US1_UNCR.dcm"), kind="endoscopy") as source:
        assert source.kind == "endoscopy"


@pytest.mark.parametrize(
    ("modality", "kind"),
    [
        ("US", "ultrasound"),
        ("XA", "fluoroscopy"),
        ("RF", "fluoroscopy"),
        ("DX", "fluoroscopy"),
        ("ES", "endoscopy"),
        ("SM", "microscope"),
        ("MR", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_kind_for_modality(modality: str | None, kind: str) -> None:
    assert kind_for_modality(modality) == kind


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.dcm"
    with pytest.raises(SourceError, match="not found") as info:
        DicomCineSource(missing)
    assert str(missing) in str(info.value)


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("not an image\n" * 20)
    with pytest.raises(SourceError, match="not a DICOM file") as info:
        DicomCineSource(path)
    assert str(path) in str(info.value)


def test_no_pixel_data(tmp_path: Path) -> None:
    def strip(ds: Dataset) -> None:
        del ds.PixelData

    with pytest.raises(SourceError, match="no pixel data"):
        DicomCineSource(_rewrite("CT_small.dcm", tmp_path, strip))


@pytest.mark.parametrize(("name", "bits"), [("rtdose.dcm", "32-bit"), ("liver_1frame.dcm", "1-bit")])
def test_unsupported_bit_depth(name: str, bits: str) -> None:
    with pytest.raises(SourceError, match=bits):
        DicomCineSource(_data(name))


def test_missing_decoder_is_reported_at_open() -> None:
    path = _data("JPGLosslessP14SV1_1s_1f_8b.dcm")
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if get_decoder(syntax).is_available:
        pytest.skip("a JPEG Lossless decoder (pylibjpeg or gdcm) is installed here")
    with pytest.raises(SourceError, match=r"no decoder.*pylibjpeg") as info:
        DicomCineSource(path)
    assert str(path) in str(info.value)


def test_missing_pillow_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    unavailable = SimpleNamespace(
        is_available=False,
        missing_dependencies=["pillow - requires pillow", "pylibjpeg - requires pylibjpeg and pylibjpeg-libjpeg"],
    )
    monkeypatch.setattr(dicom_module, "get_decoder", lambda _uid: unavailable)
    with pytest.raises(SourceError, match=r"pip install pillow \(or edgescope\[demo\]\)"):
        DicomCineSource(_data("color3d_jpeg_baseline.dcm"))


def test_undecodable_frame_raises_source_error() -> None:
    # 12-bit JPEG Extended: Pillow is a registered decoder but cannot do 12 bits.
    path = _data("JPGExtended.dcm")
    decoder = get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if set(decoder.available_plugins) - {"pillow"}:
        pytest.skip("a 12-bit JPEG decoder (pylibjpeg or gdcm) is installed here")
    with DicomCineSource(path) as source, pytest.raises(SourceError, match="cannot decode"):
        next(iter(source))
