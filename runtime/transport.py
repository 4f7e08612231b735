"""What both ends of a gRPC connection must agree on: message limits and security.

Security: TLS with the server's certificate (``--tls-cert/--tls-key``), mutual
TLS when the server names a client CA (``--tls-client-ca``) and the client
presents its own certificate, and a bearer token sent as call credentials.
Plain text is allowed only to and on a loopback address, unless ``--insecure``
is given; a token is never sent in plain text off the host (gRPC itself
refuses call credentials on an insecure channel). On loopback without TLS
the client uses gRPC's local credentials, which carry the token and check
that the connection really is local.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgescope.errors import ConfigError

# gRPC's 4 MiB default is smaller than one 1080p RGB frame (6 MB); 64 MiB fits
# a raw 4K RGB 16-bit frame (50 MB) with room for the envelope.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The client's token, when no --token-file is given.
TOKEN_ENV = "EDGESCOPE_TOKEN"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message limits set on both ends, so neither side falls back to 4 MiB."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def is_loopback(host: str) -> bool:
    """True for a loopback name or address (no name lookup: other names count as remote)."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def target_host(target: str) -> str:
    """The host part of a gRPC target: ``host:port``, ``[v6]:port``, ``dns:///host:port``, ``ipv4:a.b.c.d:port``."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        return target[1 : target.find("]")] if "]" in target else target
    if target.count(":") > 1:  # a bare IPv6 address without a port
        return target
    return target.rsplit(":", 1)[0] if ":" in target else target


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


# -- the client ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """How a client connects: TLS when a CA or a client certificate is given, else plain text on loopback."""

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None
    insecure: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None


def read_client_token(token_file: Path | None) -> str | None:
    """The token from ``token_file`` (one token, surrounding whitespace ignored), else ``$EDGESCOPE_TOKEN``."""
    text = _read(token_file, "token file").decode("utf-8", "replace") if token_file is not None else None
    if text is None:
        text = os.environ.get(TOKEN_ENV)
    if text is None or not text.strip():
        return None
    token = text.strip()
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError("the token must be one word of printable ASCII characters")
    return token


def client_credentials(target: str, security: ClientSecurity) -> grpc.ChannelCredentials | None:
    """Channel credentials for ``target``; None means a plain-text channel (``--insecure`` off loopback)."""
    if (security.tls_cert is None) != (security.tls_key is None):
        raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
    token = grpc.access_token_call_credentials(security.token) if security.token else None
    if security.tls:
        channel: grpc.ChannelCredentials = grpc.ssl_channel_credentials(
            root_certificates=_read(security.tls_ca, "CA certificate") if security.tls_ca else None,
            private_key=_read(security.tls_key, "client key") if security.tls_key else None,
            certificate_chain=_read(security.tls_cert, "client certificate") if security.tls_cert else None,
        )
    elif is_loopback(target_host(target)):
        # Local credentials carry call credentials, and refuse a connection that is not local.
        channel = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    elif security.insecure:
        if token is not None:
            raise ConfigError(
                f"a token is not sent in plain text to {target}: connect with TLS (--tls-ca) to use a token"
            )
        return None
    else:
        raise ConfigError(
            f"{target} is not a loopback address: connect with TLS (--tls-ca CA.pem), "
            "or pass --insecure to send frames in plain text"
        )
    return grpc.composite_channel_credentials(channel, token) if token is not None else channel


def aio_channel(target: str, security: ClientSecurity, options: Sequence[tuple[str, int]] = ()) -> grpc.aio.Channel:
    credentials = client_credentials(target, security)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, credentials, options=list(options))


def sync_channel(target: str, security: ClientSecurity, options: Sequence[tuple[str, int]] = ()) -> grpc.Channel:
    credentials = client_credentials(target, security)
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))


# -- the server ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert: Path
    key: Path
    # Clients must present a certificate signed by this CA (mutual TLS).
    client_ca: Path | None = None


def server_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTls | None:
    """The server's TLS settings from its flags; None for plain text."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("--tls-client-ca needs the server's own --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    return ServerTls(cert, key, client_ca)


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(_read(tls.key, "TLS key"), _read(tls.cert, "TLS certificate"))],
        root_certificates=_read(tls.client_ca, "client CA") if tls.client_ca else None,
        require_client_auth=tls.client_ca is not None,
    )


def check_exposure(host: str, *, tls: bool, authenticated: bool, insecure: bool, what: str) -> None:
    """Refuse to listen off loopback in plain text, or without authentication, unless ``--insecure``."""
    if is_loopback(host) or insecure:
        if not is_loopback(host) and authenticated and not tls:
            raise ConfigError(
                f"{what} on {host}: tokens would cross the network in plain text; give --tls-cert and --tls-key"
            )
        return
    if not tls:
        raise ConfigError(
            f"{what} on {host} (not loopback) needs TLS (--tls-cert, --tls-key); "
            "--insecure serves plain text to the network"
        )
    if not authenticated:
        raise ConfigError(
            f"{what} on {host} (not loopback) needs authentication: tokens (--token-file or "
            "EDGESCOPE_READ_TOKEN/EDGESCOPE_ADMIN_TOKEN) or client certificates (--tls-client-ca); "
            "--insecure lets anyone who reaches the port load and unload models"
        )
