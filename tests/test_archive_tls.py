"""Results reach an archive over TLS (STOW-RS over HTTPS, C-STORE over DICOM TLS), with mutual TLS;
a sender that does not trust the archive, or that the archive does not trust, keeps the object."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from edgescope.errors import ConfigError
from edgescope.runtime.archive.local_orthanc import LocalOrthanc, OrthancTls, orthanc_missing
from edgescope.runtime.archive.outbox import Outbox
from edgescope.runtime.archive.seg import Algorithm, segmentation, segments_for
from edgescope.runtime.archive.senders import sender_for

from .certs import CertificateAuthority, Issued
from .tls_front import TlsFront

CINE = get_testdata_file("color3d_jpeg_baseline.dcm")


@dataclass
class Archive:
    """Orthanc with DICOM TLS, and HTTPS by a TLS front on its HTTP port; both want a client certificate."""

    orthanc: LocalOrthanc
    https: TlsFront
    ca: Path
    device: Issued

    def url(self, way: str, query: str = "") -> str:
        base = f"dicomweb+https://127.0.0.1:{self.https.port}/dicom-web" if way == "stow" else self.orthanc.c_store
        return f"{base}?{query or f'ca={self.ca}&cert={self.device.cert}&key={self.device.key}'}"


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    site = CertificateAuthority(tmp_path / "pki", "site CA")
    server = site.issue("archive", server=True)
    running = LocalOrthanc.on_free_ports(tmp_path / "orthanc", OrthancTls(server.cert, server.key, site.path))
    running.start()
    front = TlsFront(running.http, server.cert, server.key, site.path)
    try:
        yield Archive(running, front, site.path, site.issue("edgescope-device", server=False))
    finally:
        front.close()
        running.stop()


def _seg() -> pydicom.Dataset:
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    mask = np.zeros((source.Rows, source.Columns), np.uint8)
    mask[100:200, 150:260] = 1
    return segmentation(source, [(1, mask)], segments_for(["background", "lesion"]), Algorithm("m", "1", "0" * 64))


@pytest.mark.parametrize("way", ["stow", "c_store"])
def test_an_object_sent_over_mutual_tls_is_stored(archive: Archive, tmp_path: Path, way: str) -> None:
    url = archive.url(way)
    assert url.startswith(("dicomweb+https://", "dicoms://"))
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(_seg())
    delivery = outbox.deliver(sender_for(url), timeout_s=30.0)
    assert delivery.waiting == 0 and len(delivery.sent) == 1, delivery.last_error
    assert [i["SOPInstanceUID"] for i in archive.orthanc.instances()] == delivery.sent


@pytest.mark.parametrize("way", ["stow", "c_store"])
@pytest.mark.parametrize("fault", ["wrong CA", "no client certificate"])
def test_a_sender_that_does_not_trust_the_archive_or_is_not_trusted_keeps_the_object(
    archive: Archive, tmp_path: Path, way: str, fault: str
) -> None:
    if fault == "wrong CA":
        other = CertificateAuthority(tmp_path / "other", "other CA")
        query = f"ca={other.path}&cert={archive.device.cert}&key={archive.device.key}"
    else:
        query = f"ca={archive.ca}"
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(_seg())
    refused = outbox.deliver(sender_for(archive.url(way, query)), timeout_s=1.0)
    assert refused.sent == [] and refused.waiting == 1 and refused.last_error
    assert archive.orthanc.instances() == []


def test_tls_files_are_checked_before_anything_is_sent(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    for url in (
        f"dicomweb+https://127.0.0.1:1/dicom-web?ca={missing}",
        f"dicoms://ARCHIVE@127.0.0.1:1?cert={missing}",
        f"dicomweb+http://127.0.0.1:1/dicom-web?ca={CINE}",  # TLS files on a plain-text URL
        f"dicom://ARCHIVE@127.0.0.1:1?ca={CINE}",
        f"dicoms://ARCHIVE@127.0.0.1:1?key={CINE}",  # a key without its certificate
    ):
        with pytest.raises(ConfigError):
            sender_for(url)
    # A file that is there but is not a CA bundle is refused as one too.
    for url in (f"dicoms://ARCHIVE@127.0.0.1:1?ca={CINE}", f"dicomweb+https://127.0.0.1:1/dicom-web?ca={CINE}"):
        with pytest.raises(ConfigError, match="cannot use the TLS files"):
            sender_for(url)
