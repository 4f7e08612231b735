"""A FRACTIONAL Segmentation of the echo cine, of the probabilities the runtime returned, stored in a real
archive (Orthanc on loopback): valid, readable, and frame k's values are those the runtime sent for frame k."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from edgescope.bundle import Bundle
from edgescope.errors import FrameError
from edgescope.runtime.archive.key_frames import parse_key_frames
from edgescope.runtime.archive.local_orthanc import LocalOrthanc, orthanc_missing
from edgescope.runtime.archive.outbox import Outbox
from edgescope.runtime.archive.recorders import CineRecorder
from edgescope.runtime.archive.study import parse_study_context
from edgescope.runtime.client.demo import start_server, stop_server
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.pipeline.encode import decode_mask, decode_probabilities
from edgescope.runtime.server.capture import CaptureConfig
from edgescope.runtime.server.capture_archive import CaptureResults
from edgescope.runtime.sources import SourceFrame, open_source
from edgescope.v1 import stream_pb2

from .conftest import ServerThread

highdicom = pytest.importorskip("highdicom")
pytestmark = pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "-")
CINE = get_testdata_file("color3d_jpeg_baseline.dcm")
FRAMES = 6


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    running = LocalOrthanc.on_free_ports(tmp_path_factory.mktemp("orthanc"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _fetch(archive: LocalOrthanc, sop_instance_uid: str) -> bytes:
    for instance in archive.get("/instances"):  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{archive.http}/instances/{instance}/file"
        with urllib.request.urlopen(url, timeout=10) as got:
            data: bytes = got.read()
        if pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID == sop_instance_uid:
            return data
    raise AssertionError(f"{sop_instance_uid} is not in the archive")


def _in_study(archive: LocalOrthanc, study_instance_uid: str) -> list[pydicom.Dataset]:
    found = []
    for instance in archive.get("/instances"):  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{archive.http}/instances/{instance}/file"
        with urllib.request.urlopen(url, timeout=10) as got:
            dataset = pydicom.dcmread(io.BytesIO(got.read()))
        if dataset.StudyInstanceUID == study_instance_uid:
            found.append(dataset)
    return found


def _stream(target: str, observe: object, want_probabilities: bool) -> None:
    with open_source(f"dicom:{CINE}") as source:
        options = StreamOptions(
            target=target, model="", realtime=False, max_frames=FRAMES, want_probabilities=want_probabilities
        )
        asyncio.run(stream_source(source, options, observe))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stored(
    server: ServerThread, archive: LocalOrthanc, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[int, stream_pb2.Result], Path]:
    """The runtime's results for the cine's first frames as the client received them, and the FRACTIONAL
    Segmentation the client's recorder made of them, as the archive stored it."""
    recorder = CineRecorder(Path(CINE), seg_type="fractional")
    results: dict[int, stream_pb2.Result] = {}

    def observe(frame: SourceFrame, result: stream_pb2.Result) -> None:
        assert result.status.code == stream_pb2.FRAME_STATUS_CODE_OK, result.status.reason
        results[frame.index + 1] = result
        recorder.observe(frame, result)

    _stream(server.target, observe, want_probabilities=True)
    folder = tmp_path_factory.mktemp("fractional")
    report = recorder.deliver(archive.stow, Outbox(folder / "outbox"), 60.0)
    assert report["waiting"] == 0, report["error"]
    seg_uid = next(w["sop_instance_uid"] for w in report["written"] if w["sop_class"] == "Segmentation")
    path = folder / "seg.dcm"
    path.write_bytes(_fetch(archive, seg_uid))
    return results, path


def test_the_stored_segmentation_is_fractional_probability_of_8_bits(
    stored: tuple[dict[int, stream_pb2.Result], Path],
) -> None:
    seg = pydicom.dcmread(stored[1])
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert (seg.MaximumFractionalValue, seg.BitsAllocated, seg.BitsStored) == (255, 8, 8)
    assert seg.NumberOfFrames == FRAMES * len(seg.SegmentSequence)
    # Frame k of each segment's block is source frame k, by its Derivation Image reference (A.51.5.1).
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    references = [
        groups.DerivationImageSequence[0].SourceImageSequence[0] for groups in seg.PerFrameFunctionalGroupsSequence
    ]
    assert [r.ReferencedFrameNumber for r in references[:FRAMES]] == list(range(1, FRAMES + 1))
    assert {r.ReferencedSOPInstanceUID for r in references} == {source.SOPInstanceUID}


def test_each_frames_fractions_are_the_probabilities_the_runtime_returned(
    stored: tuple[dict[int, stream_pb2.Result], Path],
) -> None:
    results, path = stored
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    seg = highdicom.seg.segread(path)
    some = False
    for number, result in results.items():
        sent = decode_probabilities(result.outputs[0].mask)
        assert sent.shape == (1, source.Rows, source.Columns)
        read = seg.get_pixels_by_source_frame(
            source.SOPInstanceUID, source_frame_numbers=[number], rescale_fractional=False
        )
        np.testing.assert_array_equal(read[0, :, :, 0], sent[0])
        # highdicom's own reading: v/255.
        scaled = seg.get_pixels_by_source_frame(source.SOPInstanceUID, source_frame_numbers=[number])
        np.testing.assert_allclose(scaled[0, :, :, 0], sent[0] / 255.0, atol=1e-6)
        some = some or bool(sent.max() > 200)
    assert some, "the model was sure of nothing: the comparison would say little"


def test_the_fractions_at_one_half_are_the_mask_but_where_resizing_differs(
    stored: tuple[dict[int, stream_pb2.Result], Path],
) -> None:
    """Above 0.5 is the mask, except within rounding of 0.5 and in the band along the mask's edge where the
    mask's nearest-neighbour resize and the probabilities' bilinear one differ: 2 pixels either side, about
    one pixel of the model's 256 x 192 grid (letterboxed) on the 640 x 480 cine."""
    results, _ = stored
    for result in results.values():
        mask = decode_mask(result.outputs[0].mask)
        probability = decode_probabilities(result.outputs[0].mask)[0].astype(np.int32)
        disagree = (probability * 2 > 255) != (mask == 1)
        near_half = np.abs(probability * 2 - 255) <= 2
        edge = cv2.morphologyEx((mask == 1).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8)) > 0
        assert not (disagree & ~near_half & ~edge).any(), int((disagree & ~near_half & ~edge).sum())
        assert (~disagree).mean() > 0.99


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed (Debian: dicom3tools)")
def test_dciodvfy_finds_no_error_in_the_fractional_segmentation(
    stored: tuple[dict[int, stream_pb2.Result], Path],
) -> None:
    run = subprocess.run(["dciodvfy", str(stored[1])], capture_output=True, text=True, timeout=120)
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []


def test_results_without_probabilities_are_refused_not_filled_in(server: ServerThread, tmp_path: Path) -> None:
    recorder = CineRecorder(Path(CINE), seg_type="fractional")
    _stream(server.target, recorder.observe, want_probabilities=False)
    assert recorder.kept.masks
    with pytest.raises(FrameError, match="FRACTIONAL Segmentation needs each label's probabilities"):
        recorder.write(Outbox(tmp_path / "outbox"))
    assert list((tmp_path / "outbox").glob("*.dcm")) == []


def test_edgescope_stream_seg_type_fractional_stores_a_fractional_segmentation(
    archive: LocalOrthanc, example_bundle: Bundle, tmp_path: Path
) -> None:
    server, target = start_server([example_bundle.path], tmp_path / "port")
    summary = tmp_path / "summary.json"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "edgescope.cli", "stream", "--source", f"dicom:{CINE}", "--target", target,
             "--frames", "3", "--fast", "--results-to", archive.stow, "--seg-type", "fractional",
             "--outbox", str(tmp_path / "outbox"), "--summary", str(summary)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        stop_server(server)
    assert run.returncode == 0, run.stderr
    written = json.loads(summary.read_text())["archive"]["written"]
    seg_uid = next(w["sop_instance_uid"] for w in written if w["sop_class"] == "Segmentation")
    seg = pydicom.dcmread(io.BytesIO(_fetch(archive, seg_uid)))
    assert seg.SegmentationType == "FRACTIONAL" and seg.NumberOfFrames == 3 * len(seg.SegmentSequence)


def test_a_captures_key_frames_get_a_fractional_segmentation_with_serve_seg_type_fractional(
    example_bundle: Bundle, archive: LocalOrthanc, tmp_path: Path
) -> None:
    study = {"patient_id": "EDGE-PAT-0031", "patient_name": "Capture^Fractional",
             "study_instance_uid": "1.2.826.0.1.3680043.8.498.90311", "accession_number": "ACC-0031"}  # fmt: skip
    server = ServerThread(
        [example_bundle.path],
        captures=[CaptureConfig.parse(f"probe=synthetic:ultrasound?fps=10&seed=3@{example_bundle.manifest.name}")],
        capture_results=CaptureResults(
            url=archive.stow,
            study=parse_study_context(study, "test"),
            policy=parse_key_frames("every:0.2", max_frames=3),
            outbox=tmp_path / "outbox",
            delivery_timeout_s=30.0,
            seg_type="fractional",
        ),
    )
    try:
        deadline = time.monotonic() + 90.0
        segs: list[pydicom.Dataset] = []
        while not segs and time.monotonic() < deadline:
            time.sleep(0.5)
            segs = [d for d in _in_study(archive, study["study_instance_uid"]) if d.Modality == "SEG"]
    finally:
        server.stop()
    assert segs, "no Segmentation of the capture's key frames was stored"
    seg = segs[0]
    assert seg.SegmentationType == "FRACTIONAL" and seg.BitsAllocated == 8
    values = np.frombuffer(seg.PixelData, np.uint8)[: seg.NumberOfFrames * seg.Rows * seg.Columns]
    # Probabilities, not a mask written as 0 and 255.
    assert len(np.unique(values)) > 2
    if shutil.which("dciodvfy"):
        path = tmp_path / "capture-seg.dcm"
        seg.save_as(path, enforce_file_format=True)
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []
