"""A local archive to try delivery against: Orthanc (Debian ``orthanc`` and ``orthanc-dicomweb``)
started on loopback with its own storage directory, receiving by STOW-RS and C-STORE.

For demonstrations and tests, not for production: no authentication, plain
HTTP, DICOM TLS (requiring a client certificate) when given ``OrthancTls``,
and it lives as long as the process that started it (``stop`` ends that
process, by its id). Orthanc's own HTTPS is left off: Debian's Orthanc 1.10
build ends with a segmentation fault on its first HTTPS request.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgescope.errors import ConfigError

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_S = 30.0


def orthanc_missing() -> str:
    """Why a local archive cannot start here; empty when it can."""
    if shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.exists():
        return "Orthanc with its DICOMweb plugin is not installed (Debian: orthanc orthanc-dicomweb)"
    return ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class OrthancTls:
    """Orthanc's DICOM TLS certificate and key (PEM, for 127.0.0.1) and the CA of its callers' certificates."""

    cert: Path
    key: Path
    client_ca: Path


@dataclass
class LocalOrthanc:
    """Orthanc on 127.0.0.1 with its storage in ``directory``; AE title ``ARCHIVE``."""

    directory: Path
    http: int
    dicom: int
    process: subprocess.Popen[bytes] | None = None
    tls: OrthancTls | None = None

    @classmethod
    def on_free_ports(cls, directory: Path, tls: OrthancTls | None = None) -> LocalOrthanc:
        return cls(directory, free_port(), free_port(), tls=tls)

    @property
    def stow(self) -> str:
        """The ``--results-to`` URL for STOW-RS."""
        return f"dicomweb+http://127.0.0.1:{self.http}/dicom-web"

    @property
    def c_store(self) -> str:
        """The ``--results-to`` URL for C-STORE (over TLS: add the caller's ``?ca=...&cert=...&key=...``)."""
        return f"dicom{'s' if self.tls else ''}://ARCHIVE@127.0.0.1:{self.dicom}"

    def start(self) -> None:
        missing = orthanc_missing()
        if missing:
            raise ConfigError(missing)
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "edgescope-local",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "storage"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ARCHIVE",
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        if self.tls is not None:
            config |= {
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(self.tls.cert),
                "DicomTlsPrivateKey": str(self.tls.key),
                "DicomTlsTrustedCertificates": str(self.tls.client_ca),
                "DicomTlsRemoteCertificateRequired": True,
            }
        (self.directory / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
        with (self.directory / "orthanc.log").open("ab") as log:
            self.process = subprocess.Popen(["Orthanc", str(self.directory / "orthanc.json")], stdout=log, stderr=log)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ConfigError(f"Orthanc did not answer in {START_S:.0f} s (its log: {self.directory / 'orthanc.log'})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as answer:
            return json.loads(answer.read())

    def instances(self) -> list[dict[str, str]]:
        """Every stored instance's main tags (Orthanc's simplified form)."""
        ids = self.get("/instances")
        assert isinstance(ids, list)
        return [self.get(f"/instances/{i}/simplified-tags") for i in ids]  # type: ignore[misc]

    def __enter__(self) -> LocalOrthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
