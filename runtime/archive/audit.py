"""An append-only, hash-chained audit trail (JSON lines) that shows any change, removal or reordering.

Each record is one JSON object on its own line with ``seq`` (0, 1, 2, ...),
``time`` (UTC, ISO 8601), ``event``, the event's fields, ``prev`` (the
previous record's ``hash``; 64 zeros for the first) and ``hash``: the SHA-256
of the record's canonical JSON without ``hash`` (keys sorted, no spaces).
Changing a record breaks its hash; removing or reordering records breaks the
next record's ``prev`` or the ``seq`` count; cutting records off the end is
shown by the count a reader compares with what it expects (``verify`` reports
the last record, so a copy kept elsewhere can be checked against it).

Records are written whole and flushed to disk (fsync) before ``append``
returns; a trail is resumed across restarts from its last record, after
verifying it. Patient identifiers never go into it: events name bundles,
models, roles and DICOM UIDs, not people.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from edgescope.errors import ConfigError

GENESIS = "0" * 64


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """The SHA-256 of a record's canonical JSON, its own ``hash`` left out."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``verify`` found: how many records hold, and the first problem (empty when none)."""

    records: int
    last_hash: str
    problem: str = ""

    @property
    def intact(self) -> bool:
        return not self.problem


def verify(path: Path) -> Verdict:
    """Check every record's hash, its link to the one before and the sequence numbers."""
    previous, count = GENESIS, 0
    with path.open("r", encoding="utf-8") as lines:
        numbered = list(enumerate(lines, start=1))
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return Verdict(count, previous, f"line {number} is not a JSON record")
        if not isinstance(record, dict):
            return Verdict(count, previous, f"line {number} is not a JSON object")
        if record.get("seq") != count:
            return Verdict(count, previous, f"line {number} has seq {record.get('seq')!r}, expected {count}")
        if record.get("prev") != previous:
            return Verdict(count, previous, f"line {number} does not follow the record before it (removed or moved)")
        if record.get("hash") != record_hash(record):
            return Verdict(count, previous, f"line {number} was changed after it was written (its hash differs)")
        previous, count = record["hash"], count + 1
    return Verdict(count, previous)


class Forward(Protocol):
    """Where each record also goes once it is on disk (``atna.SyslogForwarder``); must not block.

    It counts the records it sent, those it dropped, and its failures to send."""

    sent: int
    dropped: int
    failures: int

    def submit(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class AuditTrail:
    """Appends events to ``path``; thread-safe. Resumes an existing trail after verifying it.

    With ``forward``, each record is also handed to it, in order, after it is written."""

    def __init__(self, path: Path, forward: Forward | None = None) -> None:
        self.path = path
        self.forward = forward
        self._lock = threading.Lock()
        if path.exists():
            verdict = verify(path)
            if not verdict.intact:
                raise ConfigError(f"the audit trail {path} does not verify ({verdict.problem}); keep it, start another")
            self._seq, self._last = verdict.records, verdict.last_hash
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._seq, self._last = 0, GENESIS
        # Append-only, and never truncated by this process.
        self._file = path.open("a", encoding="utf-8")

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one record and flush it to disk; returns it (with its hash)."""
        with self._lock:
            record: dict[str, Any] = {
                "seq": self._seq,
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "event": event,
                **fields,
                "prev": self._last,
            }
            record["hash"] = record_hash(record)
            self._file.write(_canonical(record).decode("utf-8") + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._seq, self._last = self._seq + 1, record["hash"]
            if self.forward is not None:
                self.forward.submit(record)
            return record

    def close(self) -> None:
        with self._lock:
            self._file.close()
        if self.forward is not None:
            self.forward.close()


def record_results(trail: AuditTrail, report: Mapping[str, Any], *, by: str, model: str) -> None:
    """Record what a recorder's ``deliver`` did (``archive.recorders``): each DICOM object written to the
    outbox, each one the archive confirmed, and objects left waiting, with why."""
    to = _without_secrets(str(report.get("to", "")))
    for written in report.get("written", []):
        trail.append("archive_object_written", by=by, model=model, **written)
    for uid in report.get("delivered", []):
        trail.append("archive_object_delivered", by=by, to=to, sop_instance_uid=uid)
    if report.get("waiting"):
        waiting, reason = report["waiting"], report.get("error", "")
        trail.append("archive_delivery_waiting", by=by, to=to, waiting=waiting, reason=reason)


def _without_secrets(url: str) -> str:
    """``url`` without a password or query (TLS file paths): scheme, AE title or user, host, port and path."""
    parts = urlsplit(url)
    if not parts.hostname:
        return url
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}{parts.hostname}{port}{parts.path}"
