"""The audit trail forwarded as DICOM audit messages over syslog (RFC 5424 over TLS, RFC 5425 framing):
each record arrives as the message its event maps to, and a repository that is down holds up nothing."""

from __future__ import annotations

import base64
import json
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgescope.bundle import Bundle
from edgescope.errors import ConfigError
from edgescope.runtime.archive.atna import EVENTS, SyslogForwarder, audit_message, open_trail
from edgescope.runtime.archive.audit import AuditTrail
from edgescope.runtime.archive.local_orthanc import free_port

from .certs import CertificateAuthority, Issued
from .conftest import ServerThread
from .syslog_receiver import SyslogReceiver

HEADER = re.compile(rb"<85>1 (\S+) (\S+) edgescope (\d+) IHE\+RFC-3881 - \xef\xbb\xbf")
RECORDS = [
    ("server_started", {"by": "server", "version": "0.9.0"}),
    ("server_start_failed", {"by": "server", "reason": "a bundle named could not be served"}),
    ("model_loaded", {"by": "server", "model": "lesion-unet", "version": "3", "sha256": "ab" * 32}),
    ("model_refused", {"by": "token:ops@10.0.0.5", "model": "x", "bundle": "x", "reason": "no bundle named x"}),
    ("model_unloaded", {"by": "token:ops@10.0.0.5", "model": "lesion-unet"}),
    ("model_degraded", {"by": "server", "model": "lesion-unet", "reason": "GPU lost; on CPU"}),
    ("model_restored", {"by": "server", "model": "lesion-unet", "reason": ""}),
    ("domain_drift", {"model": "lesion-unet", "lane": 0, "frame": 812, "statistic": 0.41, "threshold": 0.2}),
    ("archive_object_written", {"by": "server", "model": "m", "sop_class": "SEG", "sop_instance_uid": "1.2.3.4"}),
    ("archive_object_delivered", {"by": "server", "to": "dicoms://PACS@pacs:2762", "sop_instance_uid": "1.2.3.4"}),
    ("archive_delivery_waiting", {"by": "server", "to": "dicoms://PACS@pacs:2762", "waiting": 2, "reason": "down"}),
    ("archive_write_failed", {"by": "server", "model": "m", "reason": "the outbox is full"}),
    ("server_stopped", {"by": "server"}),
]
# (EventID, action, standard EventTypeCode or None, outcome) each record type must become.
EXPECTED = {
    "server_started": ("110100", "E", "110120", "0"),
    "server_start_failed": ("110100", "E", "110120", "4"),
    "server_stopped": ("110100", "E", "110121", "0"),
    "model_loaded": ("110113", "E", "110131", "0"),
    "model_refused": ("110113", "E", "110131", "4"),
    "model_unloaded": ("110113", "E", "110131", "0"),
    "model_degraded": ("110113", "E", "110130", "4"),
    "model_restored": ("110113", "E", "110130", "0"),
    "domain_drift": ("110113", "E", None, "4"),
    "archive_object_written": ("110103", "C", None, "0"),
    "archive_object_delivered": ("110104", "R", None, "0"),
    "archive_delivery_waiting": ("110104", "R", None, "4"),
    "archive_write_failed": ("110103", "C", None, "4"),
}


@pytest.fixture
def pki(tmp_path: Path) -> tuple[CertificateAuthority, Issued, Issued]:
    site = CertificateAuthority(tmp_path / "pki", "site CA")
    return site, site.issue("audit-repository", server=True), site.issue("edgescope-device", server=False)


def _parse(message: bytes) -> tuple[ET.Element, dict[str, str]]:
    """The audit message in one syslog message, and the local record it carries."""
    header = HEADER.match(message)
    assert header is not None, message[:120]
    root = ET.fromstring(message[header.end() :])  # raises unless well-formed
    log = [o for o in root.iter("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCodeRole") == "13"]
    details = {
        d.attrib["type"]: base64.b64decode(d.attrib["value"]).decode() for d in log[0].iter("ParticipantObjectDetail")
    }
    return root, details


def _check(root: ET.Element, event: str) -> None:
    event_id, action, type_code, outcome = EXPECTED[event]
    identification = root.find("EventIdentification")
    assert identification is not None
    assert identification.get("EventActionCode") == action and identification.get("EventOutcomeIndicator") == outcome
    found_id = identification.find("EventID")
    assert found_id is not None and found_id.get("csd-code") == event_id and found_id.get("codeSystemName") == "DCM"
    types = [(t.get("csd-code"), t.get("codeSystemName")) for t in identification.iter("EventTypeCode")]
    assert types == ([(type_code, "DCM")] if type_code else []) + [(event, "99EDGESCOPE")]
    # The schema's order: the event, one or more active participants, the audit source, then the objects.
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification" and tags[1] == "ActiveParticipant"
    source = tags.index("AuditSourceIdentification")
    assert set(tags[1:source]) == {"ActiveParticipant"} and set(tags[source + 1 :]) == {
        "ParticipantObjectIdentification"
    }
    for coded in root.iter():
        if "csd-code" in coded.attrib and coded.tag != "AuditSourceTypeCode":
            assert coded.get("originalText") and coded.get("codeSystemName")
    # No patient participant object, ever.
    assert all(o.get("ParticipantObjectTypeCodeRole") != "1" for o in root.iter("ParticipantObjectIdentification"))


def test_every_record_type_becomes_its_audit_message() -> None:
    assert set(EXPECTED) == set(EVENTS)
    for seq, (event, fields) in enumerate(RECORDS):
        record = {
            "seq": seq,
            "time": "2026-12-06T10:00:00.000+00:00",
            "event": event,
            **fields,
            "prev": "0",
            "hash": "1",
        }
        root = ET.fromstring(audit_message(record, "edgescope@device-7", "file://device-7/var/log/audit.jsonl"))
        _check(root, event)
        requester = [p for p in root.iter("ActiveParticipant") if p.get("UserID") == fields.get("by")]
        if fields.get("by", "server") != "server":
            assert requester and requester[0].get("UserIsRequestor") == "true"
        if fields.get("reason"):
            assert root.findtext("EventIdentification/EventOutcomeDescription") == fields["reason"]
        if event == "archive_object_delivered":
            roles = {p.get("UserID"): p.find("RoleIDCode").get("csd-code") for p in root.iter("ActiveParticipant")}  # type: ignore[union-attr]
            assert roles == {"edgescope@device-7": "110153", "dicoms://PACS@pacs:2762": "110152"}


def test_text_xml_cannot_hold_is_replaced_not_sent_broken() -> None:
    record = {"seq": 0, "time": "2026-12-06T10:00:00.000+00:00", "event": "model_refused", "model": "m\x00",
              "reason": "bad byte \x07 in the manifest", "prev": "0", "hash": "1"}  # fmt: skip
    root = ET.fromstring(audit_message(record, "edgescope@device-7", "file://device-7/audit.jsonl"))
    assert root.findtext("EventIdentification/EventOutcomeDescription") == "bad byte \ufffd in the manifest"


def test_an_event_added_later_still_goes_as_a_security_alert_of_its_own_type() -> None:
    record = {"seq": 0, "time": "2026-12-06T10:00:00.000+00:00", "event": "something_new", "prev": "0", "hash": "1"}
    root = ET.fromstring(audit_message(record, "edgescope@device-7", "file://device-7/audit.jsonl"))
    assert root.find("EventIdentification/EventID").get("csd-code") == "110113"  # type: ignore[union-attr]
    types = [t.get("csd-code") for t in root.iter("EventTypeCode")]
    assert types == ["something_new"]


def test_records_arrive_over_mutual_tls_framed_and_matching_the_local_trail(
    tmp_path: Path, pki: tuple[CertificateAuthority, Issued, Issued]
) -> None:
    site, server, device = pki
    receiver = SyslogReceiver(tls=(server, site.path))
    url = f"tls://127.0.0.1:{receiver.port}?ca={site.path}&cert={device.cert}&key={device.key}"
    trail = AuditTrail(tmp_path / "audit.jsonl", forward=SyslogForwarder(url, tmp_path / "audit.jsonl"))
    try:
        written = [trail.append(event, **fields) for event, fields in RECORDS]
        messages = receiver.wait_for(len(RECORDS))
    finally:
        trail.close()
        receiver.close()
    assert len(messages) == len(RECORDS)
    for record, message in zip(written, messages, strict=True):
        root, details = _parse(message)
        _check(root, record["event"])
        # Each message names the local record it came from, in order.
        assert details["seq"] == str(record["seq"]) and details["hash"] == record["hash"]
        assert root.find("EventIdentification").get("EventDateTime") == record["time"]  # type: ignore[union-attr]


def test_a_repository_that_does_not_trust_the_device_gets_nothing_and_holds_up_nothing(
    tmp_path: Path, pki: tuple[CertificateAuthority, Issued, Issued]
) -> None:
    site, server, _ = pki
    other = CertificateAuthority(tmp_path / "other", "other CA").issue("stranger", server=False)
    receiver = SyslogReceiver(tls=(server, site.path))
    url = f"tls://127.0.0.1:{receiver.port}?ca={site.path}&cert={other.cert}&key={other.key}"
    forwarder = SyslogForwarder(url, tmp_path / "audit.jsonl")
    trail = AuditTrail(tmp_path / "audit.jsonl", forward=forwarder)
    try:
        trail.append("model_loaded", by="server", model="m")
        deadline = time.monotonic() + 10
        while forwarder.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        trail.close()
        receiver.close()
    assert forwarder.failures >= 1 and forwarder.sent == 0 and forwarder.last_error
    assert receiver.messages == []


def test_a_repository_that_is_down_holds_up_nothing_and_gets_the_records_when_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    forwarder = SyslogForwarder(f"tcp://127.0.0.1:{port}", tmp_path / "audit.jsonl")
    trail = AuditTrail(tmp_path / "audit.jsonl", forward=forwarder)
    receiver: SyslogReceiver | None = None
    try:
        started = time.monotonic()
        for index in range(50):
            trail.append("model_loaded", by="server", model=f"m{index}")
        # Appending waits for the disk, never for the repository.
        assert time.monotonic() - started < 5.0
        deadline = time.monotonic() + 10
        while forwarder.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert forwarder.failures >= 1 and forwarder.sent == 0
        receiver = SyslogReceiver(port)
        messages = receiver.wait_for(50, timeout_s=60)
    finally:
        trail.close()
        if receiver is not None:
            receiver.close()
    assert [_parse(m)[1]["model"] for m in messages] == [f"m{index}" for index in range(50)]


def test_a_full_queue_drops_records_from_the_forwarding_not_from_the_trail(tmp_path: Path) -> None:
    forwarder = SyslogForwarder(f"tcp://127.0.0.1:{free_port()}", tmp_path / "audit.jsonl", capacity=2)
    trail = AuditTrail(tmp_path / "audit.jsonl", forward=forwarder)
    try:
        for index in range(20):
            trail.append("model_loaded", by="server", model=f"m{index}")
    finally:
        trail.close()
    assert forwarder.dropped >= 17
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 20


def test_an_audit_repository_url_is_checked_before_anything_is_sent(tmp_path: Path) -> None:
    for url in ("udp://127.0.0.1:514", "tls://127.0.0.1", f"tcp://127.0.0.1:6514?ca={tmp_path}", "syslog.local:6514"):
        with pytest.raises(ConfigError):
            SyslogForwarder(url, tmp_path / "audit.jsonl")


def test_forwarding_needs_the_local_trail(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--audit-log"):
        open_trail(None, "tcp://127.0.0.1:6514")
    assert open_trail(None, None) is None
    trail = open_trail(tmp_path / "audit.jsonl", f"tcp://127.0.0.1:{free_port()}")
    assert trail is not None and isinstance(trail.forward, SyslogForwarder)
    trail.close()


def test_the_server_forwards_what_it_records(tmp_path: Path, example_bundle: Bundle) -> None:
    receiver = SyslogReceiver()
    audit = tmp_path / "audit.jsonl"
    served = ServerThread([example_bundle.path], audit_log=audit, audit_syslog=f"tcp://127.0.0.1:{receiver.port}")
    try:
        receiver.wait_for(2)
        metrics = served.running.telemetry.metrics.registry
        assert metrics.get_sample_value("edgescope_audit_forwarded_total") == 2
        assert metrics.get_sample_value("edgescope_audit_forward_failures_total") == 0
    finally:
        served.stop()
        # The stop's own record goes out as the trail closes.
        messages = receiver.wait_for(3)
        receiver.close()
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["event"] for r in records] == ["server_started", "model_loaded", "server_stopped"]
    assert len(messages) == 3
    for record, message in zip(records, messages, strict=True):
        root, details = _parse(message)
        _check(root, record["event"])
        assert details["hash"] == record["hash"]
    assert _parse(messages[1])[1]["sha256"] == example_bundle.onnx_sha256
