"""The server's security settings, read and checked once at start.

``SecurityConfig`` holds the flags; ``open_security`` reads the files they
name (certificates, tokens, trusted keys), refuses an exposed plain-text or
unauthenticated setup unless ``--insecure``, and returns what the server
wires in: the credentials to bind with, the call guard, the bundle policy
and model repository, and the web page's settings.

Security is split by who needs it; this module is where the server's parts
meet. ``auth`` decides who may call what (tokens, client certificates, roles,
the call guard); ``repository`` which bundles may be loaded, and from where;
``edgescope.signing`` makes and checks bundle signatures (root package: export
signs, the runtime verifies); ``edgescope.runtime.transport`` holds the TLS
and token rules both ends of a gRPC connection share (the client's side too);
``edgescope.runtime.web.server`` guards the page (Host allow-list, headers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from edgescope.runtime.server.auth import Authenticator, AuthInterceptor, TokenTable
from edgescope.runtime.server.repository import BundlePolicy, ModelRepository, check_repository
from edgescope.runtime.transport import check_exposure, server_credentials, server_tls
from edgescope.runtime.web.server import WebSecurity


@dataclass(slots=True)
class SecurityConfig:
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Lines "ROLE TOKEN"; EDGESCOPE_READ_TOKEN / EDGESCOPE_ADMIN_TOKEN add to it.
    token_file: Path | None = None
    # Serve off loopback in plain text or without authentication.
    insecure: bool = False
    # LoadModel names bundles under this directory; None: LoadModel is refused.
    model_repository: Path | None = None
    # Ed25519 public keys (PEM file or directory); None: signatures are not required.
    trusted_keys: Path | None = None
    # Host names the web page answers; empty: loopback names.
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Security:
    # Built once at start (a bad certificate path fails the start, not the first call); None: plain text.
    credentials: grpc.ServerCredentials | None
    interceptor: AuthInterceptor
    repository: ModelRepository
    web: WebSecurity

    @property
    def policy(self) -> BundlePolicy:
        return self.repository.policy

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        """Add the listening port, with TLS when configured; returns the bound port (0: failed)."""
        if self.credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.credentials)


def open_security(
    config: SecurityConfig, *, host: str, web_host: str | None, allow_failed_validation: bool
) -> Security:
    tls = server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    credentials = server_credentials(tls) if tls is not None else None
    tokens = TokenTable.load(config.token_file)
    mutual = tls is not None and tls.client_ca is not None
    authenticated = len(tokens) > 0 or mutual
    check_exposure(host, tls=tls is not None, authenticated=authenticated, insecure=config.insecure, what="gRPC")
    if web_host is not None:
        check_exposure(
            web_host, tls=tls is not None, authenticated=authenticated, insecure=config.insecure, what="the web page"
        )
    keys = None
    if config.trusted_keys is not None:
        from edgescope.signing import load_public_keys

        keys = tuple(load_public_keys(config.trusted_keys))
    root = check_repository(config.model_repository) if config.model_repository is not None else None
    policy = BundlePolicy(trusted_keys=keys, allow_failed_validation=allow_failed_validation)
    web = WebSecurity(
        allowed_hosts=config.allowed_hosts,
        token_role=tokens.role_of if len(tokens) else None,
        tls_cert=tls.cert if tls else None,
        tls_key=tls.key if tls else None,
        tls_client_ca=tls.client_ca if tls else None,
    )
    return Security(
        credentials=credentials,
        interceptor=AuthInterceptor(Authenticator(tokens, mutual_tls=mutual)),
        repository=ModelRepository(root, policy),
        web=web,
    )
