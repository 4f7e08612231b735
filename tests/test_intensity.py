"""The DICOM pixel chain (PS3.3 C.7.6.3, C.11.1, C.11.2, C.11.5) on real files from pydicom and pydicom-data.

References are pydicom's own ``apply_modality_lut`` / ``apply_windowing`` /
``apply_voi_lut`` run on the same file. pydicom's windowing outputs into the
stored range (``y_min .. y_max`` from BitsStored, PixelRepresentation and the
rescale); the runtime outputs grey levels 0..255, so the reference is brought
onto 0..255 before comparing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

from edgescope.errors import FrameError, SourceError
from edgescope.export.api import representative_inputs
from edgescope.runtime.pipeline.decode import decode_frame, encode_raw
from edgescope.runtime.pipeline.intensity import apply_intensity, select_voi
from edgescope.runtime.pipeline.preprocess import preprocess
from edgescope.runtime.sources import open_source, to_display_rgb8
from edgescope.runtime.sources.base import SourceFrame
from edgescope.runtime.sources.dicom import DicomCineSource
from edgescope.v1 import manifest_pb2, stream_pb2

PRESENTATION = manifest_pb2.Preprocessing(intensity=manifest_pb2.INTENSITY_TRANSFORM_PRESENTATION)
MODALITY = manifest_pb2.Preprocessing(intensity=manifest_pb2.INTENSITY_TRANSFORM_MODALITY)
STORED = manifest_pb2.Preprocessing(intensity=manifest_pb2.INTENSITY_TRANSFORM_STORED)


def _data(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        pytest.fail(f"{name} not found: the tests need pydicom-data (pip install edgescope[dev])")
    return Path(found)


def _first_frame(path: Path, voi: str = "") -> SourceFrame:
    with DicomCineSource(path, voi=voi) as source:
        return next(iter(source))


def _grey(frame: SourceFrame, spec: manifest_pb2.Preprocessing = PRESENTATION) -> npt.NDArray[np.float32]:
    assert frame.pixel_transform is not None
    return apply_intensity(frame.pixels, frame.pixel_transform, spec)


def _windowed_reference(ds: Dataset, stored: np.ndarray, index: int = 0) -> npt.NDArray[np.float64]:
    """pydicom's windowing of the modality values, brought from its output range onto 0..255."""
    windowed = apply_windowing(apply_modality_lut(stored, ds), ds, index=index)
    if ds.PixelRepresentation == 0:
        y_min, y_max = 0.0, float(2**ds.BitsStored - 1)
    else:
        y_min, y_max = float(-(2 ** (ds.BitsStored - 1))), float(2 ** (ds.BitsStored - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    return (np.asarray(windowed, dtype=np.float64) - y_min) / (y_max - y_min) * 255.0


def _rewrite(name: str, tmp_path: Path, change: Callable[[Dataset], None]) -> Path:
    ds = pydicom.dcmread(_data(name))
    change(ds)
    out = tmp_path / f"changed-{name}"
    ds.save_as(out)
    return out


def test_12bit_rescaled_mr_reaches_the_model_windowed_not_scaled_by_16_bits() -> None:
    path = _data("MR2_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
    assert float(ds.RescaleSlope) != 1.0
    frame = _first_frame(path)
    np.testing.assert_array_equal(_grey(frame, STORED), ds.pixel_array)
    np.testing.assert_allclose(_grey(frame, MODALITY), apply_modality_lut(ds.pixel_array, ds), rtol=1e-6)
    np.testing.assert_allclose(_grey(frame), _windowed_reference(ds, ds.pixel_array), atol=1e-3)
    # What the gate and the server feed a default model: the window spread over [0, 1], not 0..0.0625.
    spec = manifest_pb2.Preprocessing(height=64, width=64, color=manifest_pb2.COLOR_MODE_GRAY, scale=1 / 255)
    tensor, _ = preprocess(frame.pixels, spec, frame.pixel_transform)
    assert tensor.max() > 0.9


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "CT_small.dcm"])
def test_signed_ct_gives_hounsfield_units_and_its_window(name: str) -> None:
    path = _data(name)
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1
    frame = _first_frame(path)
    assert frame.pixel_transform is not None and frame.pixel_transform.signed
    np.testing.assert_array_equal(_grey(frame, STORED), ds.pixel_array)
    np.testing.assert_allclose(_grey(frame, MODALITY), apply_modality_lut(ds.pixel_array, ds))
    if "WindowCenter" in ds:
        np.testing.assert_allclose(_grey(frame), _windowed_reference(ds, ds.pixel_array), atol=1e-3)
    else:
        # No VOI: every value 16 signed bits can hold, after rescale, spread over 0..255.
        hu = apply_modality_lut(ds.pixel_array, ds)
        low = -(2**15) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        expected = (hu - low) / (65535 * float(ds.RescaleSlope)) * 255
        np.testing.assert_allclose(_grey(frame), expected, atol=1e-3)


def test_monochrome1_is_inverted_after_its_window() -> None:
    path = _data("RG3_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 10
    frame = _first_frame(path)
    expected = 255.0 - _windowed_reference(ds, ds.pixel_array)
    np.testing.assert_allclose(_grey(frame), expected, atol=1e-3)
    shown = to_display_rgb8(frame.pixels, frame.pixel_transform)
    np.testing.assert_array_equal(shown[..., 0], np.rint(_grey(frame)).astype(np.uint8))
    # Bright bone in MONOCHROME1 is a low stored value: it must be shown brighter than a high one.
    low, high = (
        np.unravel_index(ds.pixel_array.argmin(), ds.pixel_array.shape),
        np.unravel_index(ds.pixel_array.argmax(), ds.pixel_array.shape),
    )
    assert shown[low][0] > shown[high][0]


def test_modality_lut_sequence_matches_pydicom() -> None:
    path = _data("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds and ds.PixelRepresentation == 1
    frame = _first_frame(path)
    assert frame.pixel_transform is not None and frame.pixel_transform.HasField("modality_lut")
    np.testing.assert_array_equal(_grey(frame, MODALITY), apply_modality_lut(ds.pixel_array, ds))


def test_voi_lut_sequence_matches_pydicom() -> None:
    path = _data("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    frame = _first_frame(path)
    expected = apply_voi_lut(ds.pixel_array, ds).astype(np.float64) / (2**bits - 1) * 255
    np.testing.assert_allclose(_grey(frame), expected, atol=1e-3)


def test_windows_are_chosen_by_index_or_explanation_from_the_uri_or_the_manifest() -> None:
    path = _data("MR-SIEMENS-DICOM-WithOverlays.dcm")
    ds = pydicom.dcmread(path)
    assert list(ds.WindowCenterWidthExplanation) == ["WINDOW1", "WINDOW2"]
    first, second = (_windowed_reference(ds, ds.pixel_array, index=i) for i in (0, 1))
    assert not np.allclose(first, second)
    np.testing.assert_allclose(_grey(_first_frame(path)), first, atol=1e-3)  # the first by default
    with open_source(f"dicom:{path}?voi=WINDOW2") as source:
        by_uri = next(iter(source))
    np.testing.assert_allclose(_grey(by_uri), second, atol=1e-3)
    np.testing.assert_allclose(_grey(_first_frame(path, voi="1")), second, atol=1e-3)
    frame = _first_frame(path)
    by_name = manifest_pb2.Preprocessing(voi_explanation="window2")
    np.testing.assert_allclose(_grey(frame, by_name), second, atol=1e-3)
    by_index = manifest_pb2.Preprocessing(voi_index=1)
    np.testing.assert_allclose(_grey(frame, by_index), second, atol=1e-3)
    with pytest.raises(SourceError, match="WINDOW1, 1: WINDOW2"):
        _first_frame(path, voi="LUNG")
    assert frame.pixel_transform is not None
    with pytest.raises(FrameError, match="no VOI 'LUNG'"):
        select_voi(frame.pixel_transform, "LUNG")


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions_match_pydicom(tmp_path: Path, function: str) -> None:
    def use(ds: Dataset) -> None:
        ds.VOILUTFunction = function

    path = _rewrite("MR_small.dcm", tmp_path, use)
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(_grey(_first_frame(path)), _windowed_reference(ds, ds.pixel_array), atol=1e-3)


def test_enhanced_multiframe_functional_groups_per_frame_over_shared(tmp_path: Path) -> None:
    """eCT_Supplemental keeps rescale, window and spacing in its shared functional groups;
    a per-frame group for frame 1 overrides them for that frame only."""
    original = pydicom.dcmread(_data("eCT_Supplemental.dcm"))
    shared = original.SharedFunctionalGroupsSequence[0]
    assert "RescaleIntercept" not in original and "WindowCenter" not in original
    rescale = shared.PixelValueTransformationSequence[0]
    window = shared.FrameVOILUTSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]

    def per_frame_window(ds: Dataset) -> None:
        item = Dataset()
        item.WindowCenter, item.WindowWidth = 400, 1500
        ds.PerFrameFunctionalGroupsSequence[1].FrameVOILUTSequence = pydicom.sequence.Sequence([item])

    path = _rewrite("eCT_Supplemental.dcm", tmp_path, per_frame_window)
    with DicomCineSource(path) as source:
        frames = list(source)
    stored = original.pixel_array
    for frame, (center, width), raw in zip(
        frames, [(window.WindowCenter, window.WindowWidth), (400, 1500)], stored, strict=True
    ):
        reference = Dataset()
        reference.update(
            {
                "PhotometricInterpretation": original.PhotometricInterpretation,
                "BitsStored": original.BitsStored,
                "PixelRepresentation": original.PixelRepresentation,
                "RescaleSlope": rescale.RescaleSlope,
                "RescaleIntercept": rescale.RescaleIntercept,
                "WindowCenter": center,
                "WindowWidth": width,
            }
        )
        assert frame.regions[0].name == "PixelSpacing"
        assert (frame.regions[0].row_mm, frame.regions[0].column_mm) == pytest.approx(spacing)
        np.testing.assert_allclose(_grey(frame, MODALITY), apply_modality_lut(raw, reference))
        np.testing.assert_allclose(_grey(frame), _windowed_reference(reference, raw), atol=1e-3)


@pytest.mark.parametrize(
    ("rle", "plain"), [("MR_small_RLE.dcm", "MR_small.dcm"), ("emri_small_RLE.dcm", "emri_small.dcm")]
)
def test_rle_compressed_frames_are_the_same_values(rle: str, plain: str) -> None:
    with DicomCineSource(_data(rle)) as compressed, DicomCineSource(_data(plain)) as uncompressed:
        for a, b in zip(compressed, uncompressed, strict=True):
            np.testing.assert_array_equal(a.pixels, b.pixels)
            np.testing.assert_array_equal(_grey(a), _grey(b))


def test_colour_frames_carry_no_transform() -> None:
    with DicomCineSource(_data("OBXXXX1A_rle.dcm")) as source:
        (frame,) = list(source)
    assert frame.pixels.ndim == 3 and frame.pixel_transform is None
    with pytest.raises(SourceError, match="monochrome"):
        DicomCineSource(_data("OBXXXX1A.dcm"), voi="0")


def test_the_transform_travels_with_the_frame_to_the_server_preprocessing() -> None:
    path = _data("RG3_UNCR.dcm")
    frame = _first_frame(path)
    spec = manifest_pb2.Preprocessing(height=96, width=96, color=manifest_pb2.COLOR_MODE_GRAY, scale=1 / 255)
    message = stream_pb2.Frame(raw=encode_raw(frame.pixels))
    frame.describe(message)
    received = stream_pb2.Frame.FromString(message.SerializeToString())
    server_side, _ = preprocess(decode_frame(received), spec, received.pixel_transform)
    client_side, _ = preprocess(frame.pixels, spec, frame.pixel_transform)
    np.testing.assert_array_equal(server_side, client_side)


def test_export_gate_reads_dicom_through_the_same_transform() -> None:
    path = _data("MR2_UNCR.dcm")
    spec = manifest_pb2.Preprocessing(height=64, width=64, color=manifest_pb2.COLOR_MODE_GRAY, scale=1 / 255)
    (gate_input,) = representative_inputs(f"dicom:{path}", 1, spec)
    frame = _first_frame(path)
    np.testing.assert_array_equal(gate_input, preprocess(frame.pixels, spec, frame.pixel_transform)[0])
    assert gate_input.max() > 0.9
