"""A model's masks as a DICOM Segmentation of the real echo cine: valid, readable, frame for frame."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from edgescope.runtime.archive.recorders import CineRecorder
from edgescope.runtime.archive.seg import SEGMENTATION_STORAGE, Algorithm, segmentation, segments_for
from edgescope.runtime.archive.sr import measurement_report
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.sources import SourceFrame, open_source
from edgescope.v1 import stream_pb2

from .conftest import ServerThread

highdicom = pytest.importorskip("highdicom")
CINE = get_testdata_file("color3d_jpeg_baseline.dcm")
FRAMES = 12


@pytest.fixture(scope="module")
def runtime_masks(server: ServerThread) -> list[tuple[int, np.ndarray]]:
    """The served model's masks for the cine's first frames, as a client receives them."""
    masks: list[tuple[int, np.ndarray]] = []

    def keep(frame: SourceFrame, result: stream_pb2.Result) -> None:
        assert result.status.code == stream_pb2.FRAME_STATUS_CODE_OK, result.status.reason
        masks.append((frame.index + 1, decode_mask(result.outputs[0].mask)))

    with open_source(f"dicom:{CINE}") as source:
        options = StreamOptions(target=server.target, model="", realtime=False, max_frames=FRAMES)
        asyncio.run(stream_source(source, options, keep))
    assert any(mask.any() for _, mask in masks), "the model found nothing: the comparison would be empty"
    return masks


@pytest.fixture(scope="module")
def written(runtime_masks: list[tuple[int, np.ndarray]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    seg = segmentation(
        source, runtime_masks, segments_for(["background", "lesion"]), Algorithm("lesion-unet", "1", "ab" * 32, "k1")
    )
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    return path


def test_each_segmentation_frame_is_the_runtimes_mask_of_its_source_frame(
    written: Path, runtime_masks: list[tuple[int, np.ndarray]]
) -> None:
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    seg = highdicom.seg.segread(written)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and "FrameOfReferenceUID" not in source
    for number, mask in runtime_masks:
        pixels = seg.get_pixels_by_source_frame(
            source.SOPInstanceUID, source_frame_numbers=[number], assert_missing_frames_are_empty=True
        )
        np.testing.assert_array_equal(pixels[0, :, :, 0], (mask == 1).astype(pixels.dtype))


def test_the_segmentation_references_its_source_and_names_the_algorithm(written: Path) -> None:
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    seg = pydicom.dcmread(written)
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    first = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert first.DerivationCodeSequence[0].CodeValue == "113076"
    reference = first.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID and reference.ReferencedFrameNumber == 1
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    segment = seg.SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SNOMED CT: lesion
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123109"
    assert "ab" * 32 in seg.ContributingEquipmentSequence[0].ContributionDescription


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (Debian: dicom3tools)")
def test_dciodvfy_finds_no_error_in_the_segmentation(written: Path) -> None:
    run = subprocess.run(["dciodvfy", str(written)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


@pytest.fixture(scope="module")
def recorded(server: ServerThread) -> CineRecorder:
    """The client's recorder after the cine's first frames: masks and their areas in mm^2."""
    recorder = CineRecorder(Path(CINE))
    with open_source(f"dicom:{CINE}") as source:
        options = StreamOptions(target=server.target, model="", realtime=False, max_frames=FRAMES)
        asyncio.run(stream_source(source, options, recorder.observe))
    return recorder


def test_the_measurement_report_holds_the_runtimes_areas_in_mm2_and_is_valid(
    recorded: CineRecorder, tmp_path: Path
) -> None:
    kept = recorded.kept
    assert kept.measurements, "the cine's calibrated regions gave no area in mm^2"
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    algorithm = Algorithm("lesion-unet", "1", "ab" * 32)
    seg = segmentation(source, kept.masks, segments_for(kept.labels), algorithm)
    report = measurement_report(source, seg, kept.measurements, algorithm)
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    read = highdicom.sr.srread(path)
    groups = read.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(kept.measurements)
    for group, measured in zip(groups, kept.measurements, strict=True):
        area = next(m for m in group.get_measurements() if m.name.meaning == "Area")
        assert area.unit.value == "mm2" and area.value == pytest.approx(measured.area_mm2)
        assert group.reference_type.meaning == "Image Region"
    # Its evidence names the cine and the Segmentation it goes with.
    evidence = {i.ReferencedSOPInstanceUID for s in read.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}  # fmt: skip
    assert {source.SOPInstanceUID, seg.SOPInstanceUID} <= evidence
    if shutil.which("dciodvfy"):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []
