"""``edgescope serve --results-to``: a capture's key frames reach a real archive as Secondary Capture images with
their Segmentation and report, through the outbox, each object written and delivered in the audit trail."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.archive.key_frames import parse_key_frames
from edgescope.runtime.archive.local_orthanc import LocalOrthanc
from edgescope.runtime.archive.study import parse_study_context
from edgescope.runtime.server.capture import CaptureConfig
from edgescope.runtime.server.capture_archive import CaptureResults

from .conftest import ServerThread

CONTEXT = {
    "patient_id": "EDGE-PAT-2291",
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.7781",
    "accession_number": "ACC-0077",
    "uid_root": "1.2.826.0.1.3680043.8.498",
}
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SERVE = [sys.executable, "-m", "edgescope.cli", "serve", "bundle-not-read", "--port", "0", "--metrics-port", "-1"]


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} within {timeout_s:.0f} s")


def _stored(archive: LocalOrthanc) -> list[pydicom.Dataset]:
    ids = archive.get("/instances")
    assert isinstance(ids, list)
    stored = []
    for instance in ids:
        with urllib.request.urlopen(f"http://127.0.0.1:{archive.http}/instances/{instance}/file", timeout=10) as got:
            stored.append(pydicom.dcmread(io.BytesIO(got.read())))
    return stored


def test_a_captures_key_frames_reach_the_archive_and_the_audit_trail(
    example_bundle: Bundle, archive: LocalOrthanc, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    outbox = tmp_path / "outbox"
    server = ServerThread(
        [example_bundle.path],
        captures=[CaptureConfig.parse(f"probe=synthetic:ultrasound?fps=10&seed=3@{example_bundle.manifest.name}")],
        capture_results=CaptureResults(
            url=archive.stow,
            study=parse_study_context(CONTEXT, "test"),
            policy=parse_key_frames("every:0.2", max_frames=3),
            outbox=outbox,
            delivery_timeout_s=30.0,
        ),
        audit_log=audit,
    )
    try:
        # The first batch: three key images and their Segmentation (and a report where the lesion was measured).
        _wait_for(lambda: len(archive.get("/instances")) >= 4, "the first batch was not stored", 90.0)  # type: ignore[arg-type]
    finally:
        server.stop()
    stored = _stored(archive)
    images = [d for d in stored if d.SOPClassUID == SC_STORAGE]
    assert len(images) >= 3 and {d.Modality for d in stored} >= {"US", "SEG"}
    for dataset in stored:
        assert (dataset.PatientID, dataset.StudyInstanceUID) == (CONTEXT["patient_id"], CONTEXT["study_instance_uid"])
        assert dataset.SOPInstanceUID.startswith(CONTEXT["uid_root"] + ".")
    segmented = {
        item.SourceImageSequence[0].ReferencedSOPInstanceUID
        for seg in stored
        if seg.Modality == "SEG"
        for frame in seg.PerFrameFunctionalGroupsSequence
        for item in frame.DerivationImageSequence
    }
    assert segmented == {d.SOPInstanceUID for d in images}
    if shutil.which("dciodvfy"):
        for dataset in stored:
            path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
            assert [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")] == []
    assert list(outbox.glob("*.dcm")) == []

    # Every object is in the trail twice: written (with its class), then delivered; the patient is not.
    records = [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines()]
    written = {r["sop_instance_uid"]: r for r in records if r["event"] == "archive_object_written"}
    delivered = {r["sop_instance_uid"] for r in records if r["event"] == "archive_object_delivered"}
    assert set(written) == delivered == {d.SOPInstanceUID for d in stored}
    assert {r["model"] for r in written.values()} == {example_bundle.manifest.name}
    assert {r["sop_class"] for r in written.values()} >= {"Secondary Capture", "Segmentation"}
    assert CONTEXT["patient_id"] not in audit.read_text(encoding="utf-8")
    verify = [sys.executable, "-m", "edgescope.cli", "audit", "verify", str(audit)]
    verified = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--capture", "p=synthetic:ultrasound@m"], "--results-to needs --study-context FILE"),
        ([], "--results-to stores the results of the server's captures"),
        (["--capture", "p=synthetic:ultrasound@m", "--study-context", "STUDY"], "study_instance_uid is not a DICOM"),
    ],
)
def test_serve_checks_where_the_results_go_before_serving(tmp_path: Path, extra: list[str], says: str) -> None:
    study = tmp_path / "study.json"
    study.write_text(json.dumps({**CONTEXT, "study_instance_uid": "1.2.03"}), encoding="utf-8")
    extra = [str(study) if arg == "STUDY" else arg for arg in extra]
    run = subprocess.run(
        [*SERVE, "--results-to", "dicomweb+http://127.0.0.1:9/dicom-web", *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and says in run.stderr, run.stderr
    assert CONTEXT["patient_id"] not in run.stderr


def test_an_archive_that_is_down_leaves_the_objects_in_the_outbox_and_says_so(
    example_bundle: Bundle, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    outbox = tmp_path / "outbox"

    def events() -> list[dict[str, object]]:
        lines = audit.read_text(encoding="utf-8").splitlines() if audit.exists() else []
        return [json.loads(line) for line in lines]

    server = ServerThread(
        [example_bundle.path],
        captures=[CaptureConfig.parse(f"probe=synthetic:ultrasound?fps=10&seed=3@{example_bundle.manifest.name}")],
        capture_results=CaptureResults(
            url="dicomweb+http://127.0.0.1:9/dicom-web",  # nothing listens on port 9
            study=parse_study_context(CONTEXT, "test"),
            policy=parse_key_frames("every:0.2", max_frames=2),
            outbox=outbox,
            delivery_timeout_s=0.5,
        ),
        audit_log=audit,
    )
    try:
        _wait_for(
            lambda: any(e["event"] == "archive_delivery_waiting" for e in events()), "no delivery was attempted", 90.0
        )
    finally:
        stopping = time.monotonic()
        server.stop()
    # One try at an unreachable archive can take longer than this (the HTTP client's retries): the stop leaves it.
    assert time.monotonic() - stopping < 15.0
    written = {e["sop_instance_uid"] for e in events() if e["event"] == "archive_object_written"}
    assert written and {path.stem for path in outbox.glob("*.dcm")} == written
    assert not any(e["event"] == "archive_object_delivered" for e in events())
    waiting = next(e for e in events() if e["event"] == "archive_delivery_waiting")
    assert waiting["to"] == "dicomweb+http://127.0.0.1:9/dicom-web" and waiting["reason"]
