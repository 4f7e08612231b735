"""Classification and detection results as a TID 1500 Measurement Report: the top class as the coded finding
on its source frame, each box as a closed polyline on its key image, valid and stored in a real archive."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from edgescope.bundle import Bundle
from edgescope.runtime.archive.key_frames import KeyFrameChooser, parse_key_frames
from edgescope.runtime.archive.local_orthanc import LocalOrthanc
from edgescope.runtime.archive.outbox import Outbox
from edgescope.runtime.archive.recorders import CineRecorder, KeyFrameRecorder
from edgescope.runtime.archive.seg import Algorithm, Code
from edgescope.runtime.archive.sr_findings import LOCAL_SCHEME, Finding, findings_report, label_concept
from edgescope.runtime.archive.study import parse_study_context
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.sources import SourceFrame, open_source
from edgescope.v1 import stream_pb2

from .conftest import ROOT, ServerThread

highdicom = pytest.importorskip("highdicom")
pytest.importorskip("torch")
pytest.importorskip("monai")

from edgescope.export import ExportRequest, export_model  # noqa: E402

CINE = get_testdata_file("color3d_jpeg_baseline.dcm")
FACTORIES = str(ROOT / "examples" / "families" / "models.py") + ":"
VIEWS = ["A4C", "PLAX", "PSAX"]
SOURCE = "synthetic:ultrasound?frames=12&fps=10&seed=5&height=120&width=160"
CONTEXT = {
    "patient_id": "EDGE-PAT-0815",
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.5512",
    "uid_root": "1.2.826.0.1.3680043.8.498",
}
BOGUS_URL = "dicomweb+http://127.0.0.1:9/dicom-web"  # nothing listens on port 9: objects stay in the outbox


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    out = tmp_path_factory.mktemp("findings")
    common = {"input_height": 64, "input_width": 64, "samples": 3}
    requests = {
        "views": ExportRequest(
            name="views", output=out / "views", factory=FACTORIES + "build_resnet_classifier",
            task="classification", activation="softmax", labels=VIEWS, **common,
        ),
        "detector": ExportRequest(
            name="detector", output=out / "detector", factory=FACTORIES + "build_detector", task="detection",
            output_name="boxes", labels=["lesion", "instrument"], score_threshold=0.47,
            **{**common, "input_height": 96, "input_width": 96}, resize="letterbox",
        ),
    }  # fmt: skip
    return {name: export_model(request, log=lambda _line: None) for name, request in requests.items()}


@pytest.fixture(scope="module")
def served(bundles: dict[str, Bundle]) -> Iterator[ServerThread]:
    running = ServerThread([b.path for b in bundles.values()])
    try:
        yield running
    finally:
        running.stop()


def _record(
    server: ServerThread, model: str, source_spec: str, recorder: CineRecorder | KeyFrameRecorder, frames: int
) -> list[stream_pb2.Result]:
    """Stream ``source_spec`` to ``model`` through ``recorder``; the results as the client received them."""
    results: list[stream_pb2.Result] = []

    def observe(frame: SourceFrame, result: stream_pb2.Result) -> None:
        assert result.status.code == stream_pb2.FRAME_STATUS_CODE_OK, result.status.reason
        results.append(result)
        recorder.observe(frame, result)

    with open_source(source_spec) as source:
        options = StreamOptions(target=server.target, model=model, realtime=False, max_frames=frames)
        asyncio.run(stream_source(source, options, observe))
    return results


def _written(outbox: Outbox) -> dict[str, tuple[pydicom.Dataset, Path]]:
    return {(d := pydicom.dcmread(path)).Modality: (d, path) for path in outbox.pending()}


def _dciodvfy_errors(path: Path) -> list[str]:
    """What dciodvfy (dicom3tools) calls an error in ``path``; where it is not installed, the rest is still checked."""
    if shutil.which("dciodvfy") is None:
        return []
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_a_label_is_coded_as_the_bundle_codes_it_else_in_the_local_scheme() -> None:
    mass = (Code("49755003", "SCT", "Morphologically Altered Structure"), Code("4147007", "SCT", "Mass"))
    coded = label_concept("lesion", {"lesion": mass})
    assert (coded.value, coded.scheme_designator, coded.meaning) == ("4147007", "SCT", "Mass")
    local = label_concept("A4C")
    assert (local.value, local.scheme_designator, local.meaning) == ("A4C", LOCAL_SCHEME, "A4C")
    long = label_concept("apical four chamber view")
    assert len(long.value) == 16 and long.meaning == "apical four chamber view"


def test_the_bundles_codes_give_the_findings_type_and_category(tmp_path: Path) -> None:
    mass = (Code("49755003", "SCT", "Morphologically Altered Structure"), Code("4147007", "SCT", "Mass"))
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    findings = [Finding(3, "lesion", 0.9), Finding(4, "lesion", 0.6, (10.0, 20.0, 50.0, 60.0))]
    report = findings_report(source, findings, Algorithm("m", "1", "0" * 64), label_codes={"lesion": mass})
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    content = highdicom.sr.srread(path).content
    groups = [*content.get_image_measurement_groups(), *content.get_planar_roi_measurement_groups()]
    assert [(g.finding_type.value, g.finding_category.value) for g in groups] == [("4147007", "49755003")] * 2
    # Every code is a standard one: no local scheme to identify.
    assert "CodingSchemeIdentificationSequence" not in report


def test_a_classification_of_a_cine_is_a_finding_per_frame_on_that_frame(served: ServerThread, tmp_path: Path) -> None:
    recorder = CineRecorder(Path(CINE))
    results = _record(served, "views", f"dicom:{CINE}", recorder, frames=5)
    outbox = Outbox(tmp_path / "outbox")
    report = recorder.deliver(BOGUS_URL, outbox, timeout_s=0.1)
    assert [w["sop_class"] for w in report["written"]] == ["Comprehensive 3D SR (TID 1500)"]
    (sr, path), *_ = _written(outbox).values()
    assert _dciodvfy_errors(path) == []
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    read = highdicom.sr.srread(path)
    groups = read.content.get_image_measurement_groups()
    assert len(groups) == len(results) == 5
    for number, (group, result) in enumerate(zip(groups, results, strict=True), start=1):
        scores = result.outputs[0].classes
        top = int(np.argmax(scores.scores))
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (VIEWS[top], LOCAL_SCHEME)
        (certainty,) = group.get_measurements()
        assert certainty.value == pytest.approx(scores.scores[top]) and certainty.unit.value == "1"
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_frame_numbers == [number]
    # The local scheme is identified in the report, as a private scheme must be.
    assert [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence] == [LOCAL_SCHEME]


def test_boxes_on_key_frames_are_closed_polylines_on_their_key_images(served: ServerThread, tmp_path: Path) -> None:
    recorder = KeyFrameRecorder(
        parse_study_context(CONTEXT, "test"), KeyFrameChooser(parse_key_frames("every:0.3")), "ultrasound"
    )
    results = _record(served, "detector", SOURCE, recorder, frames=12)
    outbox = Outbox(tmp_path / "outbox")
    report = recorder.deliver(BOGUS_URL, outbox, timeout_s=0.1)
    kept = [results[i] for i in (0, 3, 6, 9)]  # every 0.3 s at 10 fps
    assert report["key_frames"]["kept"] == 4
    assert [w["sop_class"] for w in report["written"]] == ["Secondary Capture"] * 4 + ["Comprehensive 3D SR (TID 1500)"]
    images = sorted(
        (pydicom.dcmread(p) for p in outbox.pending() if pydicom.dcmread(p).Modality == "US"),
        key=lambda d: int(d.InstanceNumber),
    )
    (sr, path) = _written(outbox)["SR"]
    assert _dciodvfy_errors(path) == []
    groups = highdicom.sr.srread(path).content.get_planar_roi_measurement_groups()
    expected = [(k, box) for k, result in enumerate(kept) for box in result.outputs[0].boxes.boxes]
    assert expected, "the detector found no box on the key frames: the comparison would be empty"
    assert len(groups) == len(expected)
    for group, (k, box) in zip(groups, expected, strict=True):
        assert group.reference_type.meaning == "Image Region"
        region = group.roi
        assert region.graphic_type == highdicom.sr.GraphicTypeValues.POLYLINE
        corners = np.array([[box.x_min, box.y_min], [box.x_max, box.y_min], [box.x_max, box.y_max],
                            [box.x_min, box.y_max], [box.x_min, box.y_min]])  # fmt: skip
        np.testing.assert_allclose(region.value, np.clip(corners, 0, [160, 120]), atol=1e-3)
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == images[k].SOPInstanceUID
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (box.label, LOCAL_SCHEME)
        (certainty,) = group.get_measurements()
        assert certainty.value == pytest.approx(box.score)
    assert sr.StudyInstanceUID == CONTEXT["study_instance_uid"] and sr.PatientID == CONTEXT["patient_id"]


def test_edgescope_stream_stores_a_detectors_key_frames_and_report_in_the_archive(
    served: ServerThread, archive: LocalOrthanc, tmp_path: Path
) -> None:
    context = tmp_path / "study.json"
    context.write_text(json.dumps(CONTEXT), encoding="utf-8")
    summary = tmp_path / "summary.json"
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "stream", "--source", SOURCE, "--target", served.target,
         "--model", "detector", "--fast", "--results-to", archive.stow, "--study-context", str(context),
         "--key-frames", "every:0.5", "--outbox", str(tmp_path / "outbox"), "--summary", str(summary)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(summary.read_text())["archive"]
    assert report["waiting"] == 0 and len(report["delivered"]) == 4  # key images at 0, 0.5, 1 s and the report
    stored = {}
    for instance in archive.get("/instances"):  # type: ignore[union-attr]
        with urllib.request.urlopen(f"http://127.0.0.1:{archive.http}/instances/{instance}/file", timeout=10) as got:
            dataset = pydicom.dcmread(io.BytesIO(got.read()))
        stored[dataset.SOPInstanceUID] = dataset
    assert set(stored) == set(report["delivered"])
    (sr,) = [d for d in stored.values() if d.Modality == "SR"]
    path = tmp_path / "stored-sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    read = highdicom.sr.srread(path)
    images = {d.SOPInstanceUID for d in stored.values() if d.Modality == "US"}
    referenced = {g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for g in read.content.get_planar_roi_measurement_groups()}  # fmt: skip
    assert referenced and referenced <= images
