"""Where results go: a DICOMweb archive (STOW-RS) or a DICOM node (C-STORE), named by one URL.

- ``dicomweb+http://HOST:PORT/PATH`` or ``dicomweb+https://...``: STOW-RS to the
  DICOMweb root ``http(s)://HOST:PORT/PATH`` (dicomweb-client). Stored when the
  response lists the instance and no failure.
- ``dicom://CALLED_AET@HOST:PORT``: C-STORE (pynetdicom), calling AE title
  ``EDGESCOPE`` unless given (``dicom://CALLED_AET@HOST:PORT?calling=AET``).
  Stored when the status is success (0x0000). ``dicoms://...`` is the same
  over TLS (PS3.15 B.1, the TLS secure transport connection profile).

Over TLS (``dicomweb+https``, ``dicoms``) the URL may name a CA bundle and a
client certificate: ``?ca=PATH&cert=PATH&key=PATH`` (see ``tls``).

Either way, anything else raises ``DeliveryError`` with the archive's own
words; the object stays in the outbox.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom

from edgescope.errors import ConfigError
from edgescope.runtime.archive.outbox import DeliveryError, Sender
from edgescope.runtime.archive.tls import TlsFiles

CALLING_AET = "EDGESCOPE"
TIMEOUT_S = 30.0


def sender_for(url: str) -> Sender:
    """The sender ``url`` names (see the module docstring); raises ConfigError for anything else."""
    parts = urlsplit(url)
    if parts.scheme in ("dicomweb+http", "dicomweb+https"):
        secure = parts.scheme == "dicomweb+https"
        tls = TlsFiles.from_query(url, parts.query, tls=secure)
        if secure:
            tls.context()  # the files load, or ConfigError now rather than at the first delivery
        root = f"{parts.scheme.removeprefix('dicomweb+')}://{parts.netloc}{parts.path}"
        return _stow(root, tls)
    if parts.scheme in ("dicom", "dicoms"):
        if not parts.username or not parts.hostname or not parts.port:
            raise ConfigError(f"{url!r}: a DICOM node is {parts.scheme}://CALLED_AET@HOST:PORT")
        calling = parse_qs(parts.query).get("calling", [CALLING_AET])[0]
        secure = parts.scheme == "dicoms"
        tls = TlsFiles.from_query(url, parts.query, tls=secure)
        if secure:
            tls.context()  # the files load, or ConfigError now rather than at the first delivery
        return _c_store(parts.username, parts.hostname, parts.port, calling, tls if secure else None)
    raise ConfigError(
        f"{url!r} is not a place for results: use dicomweb+http(s)://HOST:PORT/PATH (STOW-RS) "
        "or dicom(s)://CALLED_AET@HOST:PORT (C-STORE, dicoms over TLS)"
    )


def _stow(root: str, tls: TlsFiles) -> Sender:
    import requests
    from dicomweb_client.api import DICOMwebClient

    class Session(requests.Session):
        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            settings = super().merge_environment_settings(*args, **kwargs)
            if tls.ca is not None:
                # The CA the URL names, not REQUESTS_CA_BUNDLE (requests lets the environment win).
                settings["verify"] = self.verify
            return settings

    verify, cert = tls.requests_options()

    def send(path: Path) -> None:
        dataset = pydicom.dcmread(path)
        # A session (and its connection) per object: nothing stays open between deliveries.
        with Session() as session:
            session.verify, session.cert = verify, cert
            try:
                response = DICOMwebClient(root, session=session, timeout=TIMEOUT_S).store_instances([dataset])
            except Exception as exc:  # requests' and dicomweb-client's own errors: the archive did not take it
                raise DeliveryError(f"STOW-RS to {root} failed: {type(exc).__name__}: {exc}"[:500]) from exc
        failed = response.get("FailedSOPSequence", [])
        stored = {item.ReferencedSOPInstanceUID for item in response.get("ReferencedSOPSequence", [])}
        if failed or dataset.SOPInstanceUID not in stored:
            raise DeliveryError(f"{root} did not confirm it stored {dataset.SOPInstanceUID}")

    return send


class _ClosingContext(ssl.SSLContext):
    """Remembers the sockets it wraps, for the sender to close: pynetdicom 3.0 skips closing a TLS
    socket whose shutdown fails (a peer that dropped it first), leaving it to the garbage collector."""

    def __init__(self, protocol: int) -> None:
        self.wrapped: list[ssl.SSLSocket] = []

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(*args, **kwargs)
        self.wrapped.append(wrapped)
        return wrapped


def _c_store(called: str, host: str, port: int, calling: str, tls: TlsFiles | None) -> Sender:
    from pynetdicom import AE

    over = " over TLS (is its certificate from the CA given, and ours one it trusts?)" if tls else ""

    def send(path: Path) -> None:
        dataset = pydicom.dcmread(path)
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        context = tls.configure(_ClosingContext(ssl.PROTOCOL_TLS_CLIENT)) if tls else None
        try:
            association = ae.associate(host, port, ae_title=called, tls_args=(context, host) if context else None)
            if not association.is_established:
                raise DeliveryError(f"{called}@{host}:{port} did not accept an association from {calling}{over}")
            try:
                status = association.send_c_store(dataset)
            finally:
                association.release()
        finally:
            for socket in context.wrapped if context else []:
                socket.close()
        code = getattr(status, "Status", None)
        if code != 0x0000:
            raise DeliveryError(f"{called}@{host}:{port} answered C-STORE with status {code!r}")

    return send
