"""A durable outbox for DICOM objects on their way to an archive: written first, sent, kept until received.

Every object is written to the outbox directory (``<SOP Instance UID>.dcm``,
via a temporary file, fsync'd, renamed, the directory fsync'd) before any
attempt to send it, so a crash, a power cut or an archive that is down loses
nothing: the next ``deliver`` (in this process or a later one) sends what is
still there. An object leaves the outbox only when the archive's receipt
says it was stored (a STOW-RS response that lists it and no failure; a
C-STORE status of success). A retried object keeps its SOP Instance UID, so
the archive stores it once however often it is sent. The outbox is bounded
(``max_bytes``): a ``put`` that would overfill it is refused, with the reason,
and nothing already in it is dropped.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset

from edgescope.errors import EdgescopeError, QuotaExceededError

DEFAULT_MAX_BYTES = 2 * 1024**3
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0


class DeliveryError(EdgescopeError):
    """An archive could not be reached, or did not confirm it stored an object."""


# Sends one object file; raises DeliveryError unless the archive's receipt confirms it.
Sender = Callable[[Path], None]


@dataclass(slots=True)
class Delivery:
    """What one ``deliver`` did: objects sent and confirmed, objects still waiting, and the last failure."""

    sent: list[str] = field(default_factory=list)
    waiting: int = 0
    last_error: str = ""


class Outbox:
    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)

    def pending(self) -> list[Path]:
        """Objects waiting, oldest first."""
        return sorted(self.directory.glob("*.dcm"), key=lambda path: (path.stat().st_mtime_ns, path.name))

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.pending())

    def put(self, dataset: Dataset) -> Path:
        """Write ``dataset`` durably; it is in the outbox when this returns."""
        target = self.directory / f"{dataset.SOPInstanceUID}.dcm"
        with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".writing-", suffix=".part", delete=False) as part:
            dataset.save_as(part, enforce_file_format=True)
            part.flush()
            os.fsync(part.fileno())
        written = Path(part.name)
        if self.size() + written.stat().st_size > self.max_bytes:
            written.unlink()
            raise QuotaExceededError(
                f"the outbox {self.directory} would pass its {self.max_bytes // 1024**2} MiB: "
                "nothing was dropped; deliver what waits (edgescope outbox send) or make room"
            )
        os.replace(written, target)
        _sync_directory(self.directory)
        return target

    def deliver(self, send: Sender, timeout_s: float) -> Delivery:
        """Send every waiting object until all are confirmed or ``timeout_s`` is spent, retrying with backoff."""
        delivery = Delivery()
        deadline = time.monotonic() + timeout_s
        backoff = FIRST_RETRY_S
        while (waiting := self.pending()) and time.monotonic() < deadline:
            failed = False
            for path in waiting:
                try:
                    send(path)
                except DeliveryError as exc:
                    delivery.last_error, failed = str(exc), True
                    break
                path.unlink()
                _sync_directory(self.directory)
                delivery.sent.append(path.stem)
            if failed:
                time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                backoff = min(backoff * 2, MAX_RETRY_S)
        delivery.waiting = len(self.pending())
        return delivery


def _sync_directory(directory: Path) -> None:
    """A rename or unlink survives a power cut once its directory is synced."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
