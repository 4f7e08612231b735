"""Where results go: a DICOMweb archive (STOW-RS) or a DICOM node (C-STORE), named by one URL.

- ``dicomweb+http://HOST:PORT/PATH`` or ``dicomweb+https://...``: STOW-RS to the
  DICOMweb root ``http(s)://HOST:PORT/PATH`` (dicomweb-client). Stored when the
  response lists the instance and no failure.
- ``dicom://CALLED_AET@HOST:PORT``: C-STORE (pynetdicom), calling AE title
  ``EDGESCOPE`` unless given (``dicom://CALLED_AET@HOST:PORT?calling=AET``).
  Stored when the status is success (0x0000).

Either way, anything else raises ``DeliveryError`` with the archive's own
words; the object stays in the outbox.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pydicom

from edgescope.errors import ConfigError
from edgescope.runtime.archive.outbox import DeliveryError, Sender

CALLING_AET = "EDGESCOPE"
TIMEOUT_S = 30.0


def sender_for(url: str) -> Sender:
    """The sender ``url`` names (see the module docstring); raises ConfigError for anything else."""
    parts = urlsplit(url)
    if parts.scheme in ("dicomweb+http", "dicomweb+https"):
        root = f"{parts.scheme.removeprefix('dicomweb+')}://{parts.netloc}{parts.path}"
        return _stow(root)
    if parts.scheme == "dicom":
        if not parts.username or not parts.hostname or not parts.port:
            raise ConfigError(f"{url!r}: a DICOM node is dicom://CALLED_AET@HOST:PORT")
        calling = parse_qs(parts.query).get("calling", [CALLING_AET])[0]
        return _c_store(parts.username, parts.hostname, parts.port, calling)
    raise ConfigError(
        f"{url!r} is not a place for results: use dicomweb+http(s)://HOST:PORT/PATH (STOW-RS) "
        "or dicom://CALLED_AET@HOST:PORT (C-STORE)"
    )


def _stow(root: str) -> Sender:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(root)

    def send(path: Path) -> None:
        dataset = pydicom.dcmread(path)
        try:
            response = client.store_instances([dataset])
        except Exception as exc:  # requests' and dicomweb-client's own errors: the archive did not take it
            raise DeliveryError(f"STOW-RS to {root} failed: {type(exc).__name__}: {exc}"[:500]) from exc
        failed = response.get("FailedSOPSequence", [])
        stored = {item.ReferencedSOPInstanceUID for item in response.get("ReferencedSOPSequence", [])}
        if failed or dataset.SOPInstanceUID not in stored:
            raise DeliveryError(f"{root} did not confirm it stored {dataset.SOPInstanceUID}")

    return send


def _c_store(called: str, host: str, port: int, calling: str) -> Sender:
    from pynetdicom import AE

    def send(path: Path) -> None:
        dataset = pydicom.dcmread(path)
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        association = ae.associate(host, port, ae_title=called)
        if not association.is_established:
            raise DeliveryError(f"{called}@{host}:{port} did not accept an association from {calling}")
        try:
            status = association.send_c_store(dataset)
        finally:
            association.release()
        code = getattr(status, "Status", None)
        if code != 0x0000:
            raise DeliveryError(f"{called}@{host}:{port} answered C-STORE with status {code!r}")

    return send
