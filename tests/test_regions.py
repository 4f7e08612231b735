"""Quantities inside the calibrated regions, from real ultrasound and X-ray files to the result.

The regions come from each file's own header, read back with pydicom here;
the mask is placed across a region's edge so part of it falls where the
frame has no physical size (header band, Doppler strip).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.pipeline.postprocess import postprocess
from edgescope.runtime.pipeline.preprocess import Geometry
from edgescope.runtime.sources.base import SourceFrame
from edgescope.runtime.sources.dicom import DicomCineSource
from edgescope.v1 import manifest_pb2, stream_pb2


def _data(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        pytest.fail(f"{name} not found: the tests need pydicom-data (pip install edgescope[dev])")
    return Path(found)


def _rewrite(name: str, tmp_path: Path, change: Callable[[Dataset], None]) -> Path:
    ds = pydicom.dcmread(_data(name))
    change(ds)
    out = tmp_path / f"changed-{name}"
    ds.save_as(out)
    return out


def _frame(path: Path) -> SourceFrame:
    with DicomCineSource(path) as source:
        return next(iter(source))


def _segment(frame: SourceFrame, mask: np.ndarray) -> dict[tuple[str, str], stream_pb2.Quantity]:
    """Run ``mask`` (frame grid) through segmentation postprocessing with what the frame carries over the wire."""
    message = stream_pb2.Frame(raw=encode_raw(frame.pixels))
    frame.describe(message)
    received = stream_pb2.Frame.FromString(message.SerializeToString())
    manifest = manifest_pb2.ModelManifest(task=manifest_pb2.TASK_SEGMENTATION, labels=["background", "lesion"])
    manifest.outputs.add(name="logits")
    manifest.postprocessing.segmentation.activation = manifest_pb2.ACTIVATION_NONE
    height, width = mask.shape
    logits = np.where(mask, 1.0, 0.0).astype(np.float32)[None, None]
    spacing = received.spacing if received.HasField("spacing") else None
    task = postprocess(
        {"logits": logits}, manifest, Geometry(height, width, 0, 0, height, width), spacing, received.regions
    )
    return {(q.name, q.region): q for q in task.quantities}


def _us_region(ds: Dataset, index: int) -> tuple[int, int, int, int, float, float]:
    r = ds.SequenceOfUltrasoundRegions[index]
    return (
        r.RegionLocationMinX0,
        r.RegionLocationMinY0,
        r.RegionLocationMaxX1,
        r.RegionLocationMaxY1,
        r.PhysicalDeltaY * 10,
        r.PhysicalDeltaX * 10,
    )


def test_area_counts_only_mask_pixels_inside_the_calibrated_ultrasound_region() -> None:
    path = _data("OBXXXX1A.dcm")
    ds = pydicom.dcmread(path)
    x0, y0, x1, y1, row_mm, col_mm = _us_region(ds, 0)
    doppler = ds.SequenceOfUltrasoundRegions[1]
    assert (doppler.PhysicalUnitsXDirection, doppler.PhysicalUnitsYDirection) != (3, 3)  # not a spatial region
    frame = _frame(path)
    (region,) = frame.regions  # the Doppler strip measures no area
    # This file's region ends at column 800 of an 800-column image: bounds are kept inside the frame.
    assert (region.x_min, region.y_min, region.x_max, region.y_max) == (x0, y0, min(x1, ds.Columns - 1), y1)
    assert (region.row_mm, region.column_mm) == pytest.approx((row_mm, col_mm))
    # A 40x60 mask straddling the region's top edge: 10 rows in the header band above it.
    mask = np.zeros(frame.pixels.shape[:2], dtype=bool)
    mask[y0 - 10 : y0 + 30, 200:260] = True
    q = _segment(frame, mask)
    area = q[("lesion_area", region.name)]
    assert area.unit == "mm2"
    assert area.pixels == 30 * 60
    assert area.value == pytest.approx(30 * 60 * row_mm * col_mm)
    assert area.pixels_outside == 10 * 60
    assert area.fraction_outside == pytest.approx(0.25)
    diameter = q[("lesion_max_diameter", region.name)]
    assert diameter.unit == "mm"
    assert diameter.value == pytest.approx(np.hypot(29 * row_mm, 59 * col_mm))
    assert q[("lesion_area_pixels", "")].value == 40 * 60


def test_a_mask_wholly_outside_the_regions_is_said_in_pixels() -> None:
    frame = _frame(_data("OBXXXX1A.dcm"))
    region = frame.regions[0]
    mask = np.zeros(frame.pixels.shape[:2], dtype=bool)
    mask[region.y_max + 10 : region.y_max + 20, 300:320] = True  # in the Doppler strip
    q = _segment(frame, mask)
    area = q[("lesion_area", "")]
    assert (area.unit, area.value, area.pixels_outside, area.fraction_outside) == ("px", 200, 200, 1.0)
    assert not [k for k in q if k[1]]  # nothing measured in a region


def test_each_region_uses_its_own_spacing(tmp_path: Path) -> None:
    def finer_right_view(ds: Dataset) -> None:
        ds.SequenceOfUltrasoundRegions[1].PhysicalDeltaX = ds.SequenceOfUltrasoundRegions[1].PhysicalDeltaX / 2
        ds.SequenceOfUltrasoundRegions[1].PhysicalDeltaY = ds.SequenceOfUltrasoundRegions[1].PhysicalDeltaY / 2

    path = _rewrite("gdcm-US-ALOKA-16.dcm", tmp_path, finer_right_view)
    ds = pydicom.dcmread(path)
    left, right = _us_region(ds, 0), _us_region(ds, 1)
    frame = _frame(path)
    assert [r.name for r in frame.regions] == ["ultrasound region 0", "ultrasound region 1"]
    assert frame.spacing_mm is None  # the views disagree: no one frame-wide spacing
    mask = np.zeros(frame.pixels.shape[:2], dtype=bool)
    mask[100:120, left[0] + 10 : left[0] + 30] = True  # 20x20 in the left view
    mask[100:120, right[0] + 10 : right[0] + 30] = True  # 20x20 in the right view
    q = _segment(frame, mask)
    assert q[("lesion_area", "ultrasound region 0")].value == pytest.approx(400 * left[4] * left[5])
    assert q[("lesion_area", "ultrasound region 1")].value == pytest.approx(400 * right[4] * right[5])
    assert q[("lesion_area", "ultrasound region 1")].pixels_outside == 0


@pytest.mark.parametrize(
    ("attributes", "name"),
    [
        ({"PixelSpacing": [0.2, 0.25]}, "PixelSpacing"),
        ({"ImagerPixelSpacing": [0.15, 0.15]}, "ImagerPixelSpacing"),
        ({"PixelSpacing": [0.2, 0.25], "ImagerPixelSpacing": [0.15, 0.15]}, "PixelSpacing"),
    ],
)
def test_xray_spacing_is_one_whole_frame_region_that_names_its_source(
    tmp_path: Path, attributes: dict[str, list[float]], name: str
) -> None:
    def set_spacing(ds: Dataset) -> None:
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)

    frame = _frame(_rewrite("RG3_UNCR.dcm", tmp_path, set_spacing))
    (region,) = frame.regions
    expected = attributes[name]
    assert (region.name, region.row_mm, region.column_mm) == (name, *expected)
    assert (region.x_max + 1, region.y_max + 1) == (frame.pixels.shape[1], frame.pixels.shape[0])
    mask = np.zeros(frame.pixels.shape[:2], dtype=bool)
    mask[:10, :10] = True
    area = _segment(frame, mask)[("lesion_area", name)]
    assert area.value == pytest.approx(100 * expected[0] * expected[1])
    assert area.pixels_outside == 0


def test_a_frame_without_calibration_measures_in_pixels() -> None:
    frame = _frame(_data("RG1_UNCR.dcm"))  # Pixel Spacing 0\\0: unknown
    assert frame.regions == () and frame.spacing_mm is None
    mask = np.zeros(frame.pixels.shape[:2], dtype=bool)
    mask[5:15, 5:25] = True
    area = _segment(frame, mask)[("lesion_area", "")]
    assert (area.value, area.unit) == (200, "px")
