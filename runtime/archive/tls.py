"""TLS towards the hospital's systems (archive, audit repository), named the same way on every URL.

A URL that asks for TLS (``dicomweb+https``, ``dicoms``, ``tls``) may carry:

- ``ca=PATH``: trust only the CAs in this PEM file (default: the system's trust store);
- ``cert=PATH``: present this client certificate (PEM), for mutual TLS;
- ``key=PATH``: its private key (PEM), when ``cert`` does not hold it too.

The peer's certificate is always verified and must name the host the URL
names (a DNS name or an IP address in its subject alternative names).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs

from edgescope.errors import ConfigError

PARAMETERS = ("ca", "cert", "key")
_Context = TypeVar("_Context", bound=ssl.SSLContext)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def from_query(cls, url: str, query: str, *, tls: bool) -> TlsFiles:
        """The files ``query`` names; ConfigError when one is missing, or when the URL does not use TLS."""
        values = parse_qs(query)
        named = {name: Path(values[name][0]) for name in PARAMETERS if name in values}
        if named and not tls:
            raise ConfigError(f"{url!r}: {', '.join(named)} only apply to a URL that uses TLS")
        for name, path in named.items():
            if not path.is_file():
                raise ConfigError(f"{url!r}: {name}={path} is not a file")
        if "key" in named and "cert" not in named:
            raise ConfigError(f"{url!r}: key= needs the certificate it belongs to (cert=)")
        return cls(named.get("ca"), named.get("cert"), named.get("key"))

    def context(self) -> ssl.SSLContext:
        """A client context: TLS 1.2 or later, the peer verified against ``ca`` (or the system's CAs)."""
        return self.configure(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))

    def configure(self, context: _Context) -> _Context:
        """Load the CAs and the client certificate into a new client ``context``; ConfigError if they do not load."""
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.ca is None:
                context.load_default_certs()
            else:
                context.load_verify_locations(cafile=str(self.ca))
            if self.cert is not None:
                context.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use the TLS files {self}: {exc}") from exc
        return context

    def requests_options(self) -> tuple[str | bool, str | tuple[str, str] | None]:
        """``verify`` and ``cert`` for a requests session."""
        verify: str | bool = str(self.ca) if self.ca else True
        if self.cert is None:
            return verify, None
        return verify, (str(self.cert), str(self.key)) if self.key else str(self.cert)
