"""Results reach a real archive: Orthanc on loopback, by STOW-RS and by C-STORE, each object exactly once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from edgescope.bundle import Bundle
from edgescope.errors import ConfigError
from edgescope.runtime.archive.audit import verify
from edgescope.runtime.archive.local_orthanc import LocalOrthanc, orthanc_missing
from edgescope.runtime.archive.outbox import Outbox
from edgescope.runtime.archive.seg import Algorithm, segmentation, segments_for
from edgescope.runtime.archive.senders import sender_for
from edgescope.runtime.client.demo import start_server, stop_server

from .syslog_receiver import SyslogReceiver

pytestmark = pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "-")
CINE = get_testdata_file("color3d_jpeg_baseline.dcm")


def _seg() -> pydicom.Dataset:
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    mask = np.zeros((source.Rows, source.Columns), np.uint8)
    mask[100:200, 150:260] = 1
    return segmentation(
        source, [(1, mask), (2, mask)], segments_for(["background", "lesion"]), Algorithm("m", "1", "0" * 64)
    )


def test_the_cines_segmentation_is_stored_by_stow_rs_from_edgescope_stream(
    archive: LocalOrthanc, example_bundle: Bundle, tmp_path: Path
) -> None:
    server, target = start_server([example_bundle.path], tmp_path / "port")
    summary = tmp_path / "summary.json"
    repository = SyslogReceiver()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "edgescope.cli", "stream", "--source", f"dicom:{CINE}", "--target", target,
             "--frames", "20", "--fast", "--results-to", archive.stow, "--outbox", str(tmp_path / "outbox"),
             "--summary", str(summary), "--audit-log", str(tmp_path / "audit.jsonl"),
             "--audit-syslog", f"tcp://127.0.0.1:{repository.port}"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        forwarded = repository.wait_for(4)
    finally:
        stop_server(server)
        repository.close()
    assert run.returncode == 0, run.stderr
    report = json.loads(summary.read_text())["archive"]
    # The Segmentation, and the Measurement Report of the areas measured in the cine's calibrated regions.
    assert report["waiting"] == 0 and len(report["delivered"]) == 2
    stored = {i["SOPInstanceUID"]: i for i in archive.instances()}
    assert set(stored) == set(report["delivered"])
    assert sorted(i["Modality"] for i in stored.values()) == ["SEG", "SR"]
    study = pydicom.dcmread(CINE, stop_before_pixels=True).StudyInstanceUID
    assert all(i["StudyInstanceUID"] == study for i in stored.values())
    assert list((tmp_path / "outbox").glob("*.dcm")) == []
    # The client's own audit trail: each object written, then each one the archive confirmed.
    assert verify(tmp_path / "audit.jsonl").intact
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["archive_object_written"] * 2 + ["archive_object_delivered"] * 2
    assert {r["sop_instance_uid"] for r in records} == set(report["delivered"])
    assert all(r["by"] == "client" for r in records) and records[-1]["to"] == archive.stow
    # ... and each record sent on to the audit repository, as DICOM Instances Accessed, then Transferred.
    event_ids = [re.findall(rb'<EventID csd-code="(\d+)"', message) for message in forwarded]
    assert event_ids == [[b"110103"]] * 2 + [[b"110104"]] * 2


def test_an_archive_that_is_down_gets_every_object_exactly_once_when_it_is_back(
    archive: LocalOrthanc, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "outbox")
    archive.stop()
    first, second = _seg(), _seg()
    outbox.put(first)
    outbox.put(second)
    down = outbox.deliver(sender_for(archive.stow), timeout_s=1.5)
    assert down.sent == [] and down.waiting == 2 and down.last_error
    archive.start()
    # A later run delivers what waited; a copy sent again keeps its UID, so the archive holds it once.
    outbox.put(first)
    run = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "outbox", "send", "--results-to", archive.stow,
         "--outbox", str(tmp_path / "outbox")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert sorted(i["SOPInstanceUID"] for i in archive.instances()) == sorted(
        [first.SOPInstanceUID, second.SOPInstanceUID]
    )


def test_c_store_is_confirmed_and_a_wrong_ae_title_keeps_the_object(archive: LocalOrthanc, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(_seg())
    refused = outbox.deliver(sender_for(f"dicom://NOT-IT@127.0.0.1:{archive.dicom}"), timeout_s=1.0)
    assert refused.waiting == 1 and "did not accept" in refused.last_error
    stored = outbox.deliver(sender_for(f"dicom://ARCHIVE@127.0.0.1:{archive.dicom}"), timeout_s=30.0)
    assert stored.waiting == 0 and len(stored.sent) == 1
    assert [i["SOPInstanceUID"] for i in archive.instances()] == stored.sent


def test_a_place_that_is_not_an_archive_is_refused_before_anything_is_sent() -> None:
    for url in ("http://127.0.0.1:1/dicom-web", "dicom://127.0.0.1:104", "ftp://x"):
        with pytest.raises(ConfigError):
            sender_for(url)
