"""Key frames of a source that is not DICOM: Secondary Capture images in a given study, their Segmentation and
report, chosen by a bounded policy, checked before streaming, delivered to a real archive."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest

from edgescope.errors import ConfigError
from edgescope.runtime.archive.key_frames import KeyFrameChooser, parse_key_frames
from edgescope.runtime.archive.local_orthanc import LocalOrthanc
from edgescope.runtime.archive.outbox import Outbox
from edgescope.runtime.archive.recorders import KeyFrameRecorder
from edgescope.runtime.archive.study import load_study_context, parse_study_context
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.pipeline.encode import decode_mask, encode_mask
from edgescope.runtime.sources import SourceFrame, open_source
from edgescope.v1 import stream_pb2

from .conftest import ServerThread

PATIENT_ID = "EDGE-PAT-7731"
PATIENT_NAME = "Kowalska^Zofia"
CONTEXT = {
    "patient_id": PATIENT_ID,
    "patient_name": PATIENT_NAME,
    "patient_birth_date": "19710304",
    "patient_sex": "F",
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.4471",
    "accession_number": "ACC-0042",
    "study_id": "ES-17",
    "study_date": "20250611",
    "study_time": "093000",
    "referring_physician_name": "Nowak^Jan",
    "uid_root": "1.2.826.0.1.3680043.8.498",
}
SOURCE = "synthetic:ultrasound?frames=24&fps=10&seed=3"


def _context_file(directory: Path, **changes: str) -> Path:
    lines = [f'{key} = "{value}"' for key, value in {**CONTEXT, **changes}.items()]
    path = directory / "study.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_study_context_is_read_from_toml_or_json(tmp_path: Path) -> None:
    from_toml = load_study_context(_context_file(tmp_path))
    (tmp_path / "study.json").write_text(json.dumps(CONTEXT), encoding="utf-8")
    assert load_study_context(tmp_path / "study.json") == from_toml
    assert from_toml.patient_id == PATIENT_ID and from_toml.new_uid().startswith(CONTEXT["uid_root"] + ".")


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("study_instance_uid", "", "study_instance_uid is missing"),
        ("study_instance_uid", "1.2.03.4", "study_instance_uid is not a DICOM UID"),
        ("study_instance_uid", "1.2.x.4", "study_instance_uid is not a DICOM UID"),
        ("study_instance_uid", "1." + "2" * 63, "study_instance_uid is not a DICOM UID"),
        ("uid_root", "1.2..3", "uid_root is not a DICOM UID"),
        ("patient_id", "", "patient_id is missing"),
        ("patient_birth_date", "04/03/1971", "patient_birth_date must be a date YYYYMMDD"),
        ("study_time", "25:00", "study_time must be a time HHMMSS"),
        ("patient_sex", "female", "patient_sex must be M, F or O"),
        ("accession_number", "A" * 17, "accession_number must be at most 16"),
    ],
)
def test_a_wrong_field_is_named_and_its_value_is_not_repeated(field: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as raised:
        parse_study_context({**CONTEXT, field: value}, "study.toml")
    assert PATIENT_NAME not in str(raised.value) and PATIENT_ID not in str(raised.value)


def test_an_unknown_field_is_refused_rather_than_dropped() -> None:
    with pytest.raises(ConfigError, match=r"unknown field.*patient_nmae"):
        parse_study_context({**CONTEXT, "patient_nmae": "x"}, "study.toml")


def _frame(index: int, fps: float = 10.0) -> SourceFrame:
    return SourceFrame(index, np.zeros((64, 64), np.uint8), index / fps, None)


def _result(*alerts: int) -> stream_pb2.Result:
    result = stream_pb2.Result(status=stream_pb2.FrameStatus(code=stream_pb2.FRAME_STATUS_CODE_OK))
    result.alerts.extend(stream_pb2.Alert(kind=kind) for kind in alerts)
    return result


def test_every_seconds_keeps_one_frame_per_period_up_to_the_limit() -> None:
    chooser = KeyFrameChooser(parse_key_frames("every:0.5", max_frames=3))
    kept = [i for i in range(30) if chooser.choose(_frame(i), _result())]
    assert kept == [0, 5, 10] and chooser.over_limit == 3  # frames 15, 20, 25


def test_on_alert_keeps_the_frame_where_an_alert_starts_not_every_frame_it_lasts() -> None:
    chooser = KeyFrameChooser(parse_key_frames("on-alert"))
    out_of_domain, late = stream_pb2.Alert.KIND_OUT_OF_DOMAIN, stream_pb2.Alert.KIND_LATENCY_BUDGET_EXCEEDED
    alerts = [(), (out_of_domain,), (out_of_domain,), (), (out_of_domain, late), (late,)]
    reasons = [chooser.choose(_frame(i), _result(*kinds)) for i, kinds in enumerate(alerts)]
    assert reasons == [None, "alert: out_of_domain", None, None, "alert: latency_budget_exceeded, out_of_domain", None]
    dropped = stream_pb2.Result(status=stream_pb2.FrameStatus(code=stream_pb2.FRAME_STATUS_CODE_DROPPED))
    assert chooser.choose(_frame(9), dropped) is None


@pytest.mark.parametrize("policy", ["every:0", "every:x", "sometimes", "on-alert:2"])
def test_a_wrong_policy_is_refused(policy: str) -> None:
    with pytest.raises(ConfigError, match="--key-frames"):
        parse_key_frames(policy)


def test_an_uncalibrated_camera_gets_no_pixel_spacing_and_no_report(tmp_path: Path) -> None:
    """An endoscope's frames have no physical pixel size: the key images say none, and no areas are reported."""
    recorder = KeyFrameRecorder(
        parse_study_context(CONTEXT, "test"), KeyFrameChooser(parse_key_frames("every:0.1")), "endoscopy"
    )
    with open_source("synthetic:endoscopy?frames=3&fps=5&height=96&width=128") as source:
        for frame in source:
            assert frame.spacing_mm is None
            mask = np.zeros(frame.pixels.shape[:2], np.uint8)
            mask[20:50, 30:70] = 1
            result = _result()
            result.outputs.add().mask.CopyFrom(
                encode_mask(mask, ["background", "lesion"], stream_pb2.MASK_ENCODING_PNG)
            )
            result.quantities.add(name="lesion_area", value=1200.0, unit="px2")
            recorder.observe(frame, result)
    outbox = Outbox(tmp_path / "outbox")
    # Nothing listens on port 9: delivery fails and everything stays in the outbox to be read here.
    report = recorder.deliver("dicomweb+http://127.0.0.1:9/dicom-web", outbox, timeout_s=0.1)
    assert [w["sop_class"] for w in report["written"]] == ["Secondary Capture"] * 3 + ["Segmentation"]
    for path in outbox.pending():
        written = pydicom.dcmread(path)
        assert "PixelSpacing" not in written and written.PatientID == PATIENT_ID
        if written.Modality != "SEG":
            assert written.Modality == "ES" and written.PhotometricInterpretation == "RGB"


def test_a_malformed_study_context_fails_before_streaming(tmp_path: Path) -> None:
    context = _context_file(tmp_path, study_instance_uid="1.2.840.0099.1")
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "stream", "--source", SOURCE, "--target", "127.0.0.1:9",
         "--results-to", "dicomweb+http://127.0.0.1:9/dicom-web", "--study-context", str(context),
         "--outbox", str(tmp_path / "outbox")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert "study_instance_uid is not a DICOM UID" in run.stderr and "streaming" not in run.stdout
    assert PATIENT_NAME not in run.stdout + run.stderr and PATIENT_ID not in run.stdout + run.stderr


def test_a_source_that_is_not_dicom_needs_a_study_context(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "stream", "--source", SOURCE, "--target", "127.0.0.1:9",
         "--results-to", "dicomweb+http://127.0.0.1:9/dicom-web", "--outbox", str(tmp_path / "outbox")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "needs --study-context FILE" in run.stderr


def test_a_dicom_source_keeps_its_own_study(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "stream", "--source", f"dicom:{tmp_path / 'cine.dcm'}",
         "--target", "127.0.0.1:9", "--results-to", "dicomweb+http://127.0.0.1:9/dicom-web",
         "--study-context", str(_context_file(tmp_path)), "--outbox", str(tmp_path / "outbox")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "leave out --study-context" in run.stderr


def _runtime_masks(server: ServerThread) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The source's frames and the served model's mask of each, as a client receives them."""
    frames: list[np.ndarray] = []
    masks: list[np.ndarray] = []

    def keep(frame: SourceFrame, result: stream_pb2.Result) -> None:
        assert result.status.code == stream_pb2.FRAME_STATUS_CODE_OK, result.status.reason
        frames.append(frame.pixels.copy())
        masks.append(decode_mask(result.outputs[0].mask))

    with open_source(SOURCE) as source:
        asyncio.run(stream_source(source, StreamOptions(target=server.target, model="", realtime=False), keep))
    return frames, masks


def test_key_frames_of_a_synthetic_ultrasound_stream_reach_the_archive_as_sc_seg_and_sr(
    server: ServerThread, archive: LocalOrthanc, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    summary = tmp_path / "summary.json"
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "stream", "--source", SOURCE, "--target", server.target, "--fast",
         "--results-to", archive.stow, "--study-context", str(_context_file(tmp_path)),
         "--key-frames", "every:0.5", "--max-key-frames", "4",
         "--outbox", str(tmp_path / "outbox"), "--summary", str(summary)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(summary.read_text())["archive"]
    # Frames at 0, 0.5, 1.0 and 1.5 s kept; the one at 2.0 s was over the limit.
    assert report["key_frames"] == {"policy": "every:0.5", "kept": 4, "over_the_limit": 1}
    assert report["waiting"] == 0 and list((tmp_path / "outbox").glob("*.dcm")) == []

    stored = {}
    ids = archive.get("/instances")
    assert isinstance(ids, list)
    for instance in ids:
        with urllib.request.urlopen(f"http://127.0.0.1:{archive.http}/instances/{instance}/file", timeout=10) as got:
            dataset = pydicom.dcmread(io.BytesIO(got.read()))
        path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        stored[dataset.SOPInstanceUID] = (dataset, path)
    assert set(stored) == set(report["delivered"])
    images = sorted((d for d, _ in stored.values() if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"),
                    key=lambda d: int(d.InstanceNumber))  # fmt: skip
    (seg_dataset, seg_path), *_ = [(d, p) for d, p in stored.values() if d.Modality == "SEG"]
    assert len(images) == 4 and all(d.Modality == "US" for d in images)
    for dataset, _ in stored.values():
        assert (dataset.PatientID, str(dataset.PatientName)) == (PATIENT_ID, PATIENT_NAME)
        assert dataset.StudyInstanceUID == CONTEXT["study_instance_uid"]
        assert dataset.AccessionNumber == CONTEXT["accession_number"]
        assert dataset.SOPInstanceUID.startswith(CONTEXT["uid_root"] + ".")
    if shutil.which("dciodvfy"):
        for _, path in stored.values():
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
            assert [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")] == []

    # The key images are the source's frames as streamed; the Segmentation's frame k is the runtime's mask of image k.
    frames, masks = _runtime_masks(server)
    seg = highdicom.seg.segread(seg_path)
    measured = False
    for image in images:
        index = next(i for i, pixels in enumerate(frames) if np.array_equal(pixels, image.pixel_array))
        assert index == 5 * (int(image.InstanceNumber) - 1)
        assert [float(v) for v in image.PixelSpacing] == [0.3, 0.3]  # the synthetic probe's calibration
        pixels = seg.get_pixels_by_source_instance([image.SOPInstanceUID], assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(pixels[0, :, :, 0], (masks[index] == 1).astype(pixels.dtype))
        measured = measured or bool(masks[index].any())
    assert measured, "the model found nothing on the key frames: the comparison would be empty"
    # Areas measured in mm^2 (the probe is calibrated): the report of them is there, on the key images.
    (report_dataset,) = [d for d, _ in stored.values() if d.Modality == "SR"]
    evidence = {i.ReferencedSOPInstanceUID for s in report_dataset.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}  # fmt: skip
    assert {d.SOPInstanceUID for d in images} | {seg_dataset.SOPInstanceUID} == evidence

    # The patient is named in the DICOM objects only: not in the command's output, its summary, or the server's log.
    logs = run.stdout + run.stderr + summary.read_text() + "\n".join(r.getMessage() for r in caplog.records)
    assert PATIENT_ID not in logs and "Kowalska" not in logs
