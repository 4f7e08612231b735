"""The audit trail forwarded to the hospital's audit record repository (IHE ATNA), record by record.

Each record of the local trail (``audit.AuditTrail``) becomes one DICOM audit
message (PS3.15 A.5: the XML schema of A.5.1, the event IDs and type codes of
A.5.3 and PS3.16 CID 400/401) and is sent as a syslog message (RFC 5424:
facility 10, security; severity 5, notice; MSGID ``IHE+RFC-3881``) over

- ``tls://HOST:PORT``: TLS (RFC 5425), with ``?ca=&cert=&key=`` as for every
  TLS URL (``tls``); repositories usually want a client certificate;
- ``tcp://HOST:PORT``: plain TCP (RFC 6587), for a collector on the same host.

Both frame a message by octet counting (``LEN SP MSG``).

Which message a record becomes (``EVENTS``): the server's start (or a start
that failed) and stop are Application Activity; model loads, unloads and refusals
are Security Alerts of type Software Configuration; a model's failover to
another device and its return, of type Hardware Configuration; a domain drift
alert is a Security Alert with only the record's own type; a DICOM object
written is DICOM Instances Accessed (create); one the archive confirmed, DICOM
Instances Transferred (read: the sender does not know what the receiver
held). A failure (a start or a load refused, a failover, a drift, objects not
written or left waiting) has outcome 4, minor failure, with the record's
reason as the outcome description.
Every message also carries the record's event name as an extra type code in
the local scheme ``99EDGESCOPE``, and the local record itself (its ``seq``,
``hash`` and fields) as the details of a Security Audit Log participant
object, so each message can be matched to the record it came from. No patient
participant object is sent: the trail holds no patient identifiers, and
neither do these messages (PS3.15 asks for one in Instances messages; the
repository learns the patient from the archive, by the object UIDs).

Forwarding never holds up the caller: ``submit`` puts the record in a bounded
queue and a thread of its own sends it, reconnecting with backoff. A record
that does not fit the queue is dropped and counted; failures are counted and
logged. The local trail stays the record of what happened.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import re
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgescope.errors import ConfigError
from edgescope.runtime.archive.audit import AuditTrail
from edgescope.runtime.archive.tls import TlsFiles

logger = logging.getLogger(__name__)

QUEUE_RECORDS = 10_000
CONNECT_S = 10.0
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0
CLOSE_S = 5.0
ACCEPT_S = 1.0
# RFC 5424 PRI: facility 10 (security/authorization) * 8 + severity 5 (notice).
PRI = 85
MSGID = "IHE+RFC-3881"
LOCAL_SCHEME = "99EDGESCOPE"


@dataclass(frozen=True, slots=True)
class Code:
    value: str
    scheme: str
    meaning: str


APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
HARDWARE_CONFIGURATION = Code("110130", "DCM", "Hardware Configuration")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
APPLICATION = Code("110150", "DCM", "Application")
DESTINATION = Code("110152", "DCM", "Destination Role ID")
SOURCE = Code("110153", "DCM", "Source Role ID")
URI = Code("12", "RFC-3881", "URI")
MODEL_NAME = Code("model", LOCAL_SCHEME, "Model name")
SOP_INSTANCE_UID = Code("sop_instance_uid", LOCAL_SCHEME, "SOP Instance UID")


@dataclass(frozen=True, slots=True)
class Event:
    """The audit message a record becomes: its event ID, action, standard type (if any), and whether it
    reports a failure."""

    id: Code
    action: str
    type: Code | None = None
    failed: bool = False


EVENTS: dict[str, Event] = {
    "server_started": Event(APPLICATION_ACTIVITY, "E", APPLICATION_START),
    "server_start_failed": Event(APPLICATION_ACTIVITY, "E", APPLICATION_START, failed=True),
    "server_stopped": Event(APPLICATION_ACTIVITY, "E", APPLICATION_STOP),
    "model_loaded": Event(SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION),
    "model_unloaded": Event(SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION),
    "model_refused": Event(SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION, failed=True),
    "model_degraded": Event(SECURITY_ALERT, "E", HARDWARE_CONFIGURATION, failed=True),
    "model_restored": Event(SECURITY_ALERT, "E", HARDWARE_CONFIGURATION),
    "domain_drift": Event(SECURITY_ALERT, "E", failed=True),
    "archive_object_written": Event(INSTANCES_ACCESSED, "C"),
    "archive_write_failed": Event(INSTANCES_ACCESSED, "C", failed=True),
    "archive_object_delivered": Event(INSTANCES_TRANSFERRED, "R"),
    "archive_delivery_waiting": Event(INSTANCES_TRANSFERRED, "R", failed=True),
}
# A record of an event not listed above (one added later) still goes, as a Security Alert of its own type.
OTHER = Event(SECURITY_ALERT, "E")


# Characters XML 1.0 cannot hold (ElementTree would write them, and the message would not parse).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: object) -> str:
    return _NOT_XML.sub("\ufffd", str(value))


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code.value, "codeSystemName": code.scheme, "originalText": code.meaning})


def _participant_object(
    parent: ET.Element, object_id: str, id_type: Code, name: str, type_code: str, role: str
) -> ET.Element:
    element = ET.SubElement(
        parent,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": object_id,
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    ET.SubElement(element, "ParticipantObjectName").text = name
    return element


def audit_message(record: Mapping[str, Any], source_id: str, trail: str) -> bytes:
    """The DICOM audit message (UTF-8 XML) for one audit trail record; ``trail`` names the local trail (a URI)."""
    name = _text(record.get("event", ""))
    event = EVENTS.get(name, OTHER)
    reason = record.get("reason")
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": _text(record["time"]),
            "EventOutcomeIndicator": "4" if event.failed else "0",
        },
    )
    _code(identification, "EventID", event.id)
    if event.type is not None:
        _code(identification, "EventTypeCode", event.type)
    _code(identification, "EventTypeCode", Code(name, LOCAL_SCHEME, name.replace("_", " ")))
    if reason:
        ET.SubElement(identification, "EventOutcomeDescription").text = _text(reason)

    by = _text(record.get("by", "server"))
    transfer = event.id == INSTANCES_TRANSFERRED
    application = ET.SubElement(
        root, "ActiveParticipant", {"UserID": source_id, "UserIsRequestor": "true" if by == "server" else "false"}
    )
    _code(application, "RoleIDCode", SOURCE if transfer else APPLICATION)
    if by != "server":
        # The caller as the server knows it: a credential's name and a host, never a person's record.
        ET.SubElement(root, "ActiveParticipant", {"UserID": by, "UserIsRequestor": "true"})
    if transfer and "to" in record:
        destination = ET.SubElement(
            root, "ActiveParticipant", {"UserID": _text(record["to"]), "UserIsRequestor": "false"}
        )
        _code(destination, "RoleIDCode", DESTINATION)

    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # an application server process

    if "model" in record:
        # Type 2 (system object), role 26 (processing element): the model that produced or was changed.
        model = _text(record["model"])
        _participant_object(root, model, MODEL_NAME, model, "2", "26")
    if "sop_instance_uid" in record:
        kind = _text(record.get("sop_class", "DICOM object"))
        _participant_object(root, _text(record["sop_instance_uid"]), SOP_INSTANCE_UID, kind, "2", "3")

    log = _participant_object(root, trail, URI, "Security Audit Log", "2", "13")
    for key, value in record.items():
        if key == "time":
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        ET.SubElement(log, "ParticipantObjectDetail", {"type": key, "value": base64.b64encode(text.encode()).decode()})
    message: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return message


def syslog_frame(message: bytes, *, timestamp: str, hostname: str, app_name: str = "edgescope") -> bytes:
    """One RFC 5424 message (UTF-8 with its byte order mark), framed by octet counting (RFC 5425/6587)."""
    header = f"<{PRI}>1 {timestamp} {hostname[:255] or '-'} {app_name} {os.getpid()} {MSGID} - "
    payload = header.encode("ascii", "replace") + b"\xef\xbb\xbf" + message
    return f"{len(payload)} ".encode("ascii") + payload


class SyslogForwarder:
    """Sends audit records to ``url`` (``tls://`` or ``tcp://HOST:PORT``) from a thread of its own."""

    def __init__(self, url: str, trail: Path, capacity: int = QUEUE_RECORDS) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("tls", "tcp") or not parts.hostname or not parts.port:
            raise ConfigError(f"{url!r}: an audit repository is tls://HOST:PORT (RFC 5425) or tcp://HOST:PORT")
        tls = TlsFiles.from_query(url, parts.query, tls=parts.scheme == "tls")
        self.where = f"{parts.scheme}://{parts.hostname}:{parts.port}"
        self._address = (parts.hostname, parts.port)
        self._context = tls.context() if parts.scheme == "tls" else None
        self._hostname = socket.gethostname()
        self._trail = f"file://{self._hostname}{trail.resolve()}"
        self._source_id = f"edgescope@{self._hostname}"
        self._queue: queue.Queue[Mapping[str, Any]] = queue.Queue(capacity)
        self._socket: socket.socket | None = None
        self._stop = threading.Event()
        self.sent = self.dropped = self.failures = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name="edgescope-audit-forward", daemon=True)
        self._thread.start()

    def submit(self, record: Mapping[str, Any]) -> None:
        """Queue ``record`` for sending; never blocks. A full queue drops it (counted, logged)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error(
                    "audit forwarding to %s is %d record(s) behind: %d dropped so far (the local audit log has them)",
                    self.where,
                    self._queue.qsize(),
                    self.dropped,
                )

    def close(self, timeout_s: float = CLOSE_S) -> None:
        """Send what is queued for at most ``timeout_s`` (one try each), then stop."""
        self._stop.set()
        self._thread.join(timeout_s)
        left = self._queue.qsize()
        if left:
            logger.warning("audit forwarding to %s stopped with %d record(s) not sent", self.where, left)

    def _run(self) -> None:
        backoff = FIRST_RETRY_S
        frame: bytes | None = None
        while True:
            if frame is None:
                try:
                    record = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    continue
                try:
                    frame = syslog_frame(
                        audit_message(record, self._source_id, self._trail),
                        timestamp=_text(record["time"]),
                        hostname=self._hostname,
                    )
                except Exception:  # a record this cannot express must not end the forwarding of the rest
                    self.dropped += 1
                    logger.exception("audit record %s was not forwarded (the local trail has it)", record.get("seq"))
                    continue
            try:
                self._send(frame)
            except OSError as exc:  # ssl.SSLError and timeouts included
                self._disconnect()
                self.failures += 1
                if not self.last_error:
                    logger.warning(
                        "audit forwarding to %s failed (%s); retrying, records queue meanwhile", self.where, exc
                    )
                self.last_error = str(exc) or type(exc).__name__
                if self._stop.wait(backoff):
                    break  # closing: what could not be sent stays in the local trail
                backoff = min(backoff * 2, MAX_RETRY_S)
                continue
            frame, backoff = None, FIRST_RETRY_S
            self.sent += 1
            if self.last_error:
                logger.info("audit forwarding to %s works again", self.where)
                self.last_error = ""
        self._disconnect()

    def _send(self, frame: bytes) -> None:
        if self._socket is not None:
            _check_open(self._socket, 0.0)
        else:
            raw = socket.create_connection(self._address, timeout=CONNECT_S)
            try:
                self._socket = (
                    self._context.wrap_socket(raw, server_hostname=self._address[0]) if self._context else raw
                )
            except OSError:
                raw.close()
                raise
            # Under TLS 1.3 a repository refuses our certificate only after the handshake: wait for its word.
            _check_open(self._socket, ACCEPT_S)
        self._socket.sendall(frame)

    def _disconnect(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def open_trail(path: Path | None, syslog: str | None) -> AuditTrail | None:
    """The audit trail at ``path``, forwarding each record to ``syslog`` when given; None without a path."""
    if path is None:
        if syslog:
            raise ConfigError("--audit-syslog forwards the audit trail: give --audit-log PATH too")
        return None
    forward = SyslogForwarder(syslog, path) if syslog else None
    try:
        return AuditTrail(path, forward=forward)
    except ConfigError:
        if forward is not None:
            forward.close()
        raise


def _check_open(connection: socket.socket, wait_s: float) -> None:
    """Raise OSError if the repository has ended ``connection`` (waiting up to ``wait_s`` to hear so).

    A syslog repository never writes: anything to read is its end (a TLS alert, or the close)."""
    connection.settimeout(wait_s)
    try:
        data = connection.recv(1)
    except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
        return
    finally:
        connection.settimeout(CONNECT_S)
    raise ConnectionError("the repository closed the connection" if not data else "the repository wrote to us")
