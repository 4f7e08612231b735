"""Signed bundles: an Ed25519 signature over the manifest's exact bytes.

The manifest lists every file of a bundle with its sha256, so signing its
bytes signs the whole bundle. The signature sits beside it in
``manifest.sig``, a small JSON document::

    {"algorithm": "Ed25519", "key": "<sha256 of the raw public key>", "signature": "<base64>"}

Keys are PEM files: the private key (PKCS#8) stays with whoever releases
models; servers get the public keys (``--trusted-keys``: one PEM file holding
one or more keys, or a directory of ``*.pem`` files).

It sits in the root package because export signs and the runtime verifies;
the server's other security lives in ``edgescope.runtime.server.security``
(which lists where each part is).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgescope.bundle import SIGNATURE_FILE, SignatureCheck, load_bundle
from edgescope.errors import BundleError, ConfigError

ALGORITHM = "Ed25519"
_PEM_END = b"-----END PUBLIC KEY-----"
# A signature file is about 200 bytes.
_MAX_SIGNATURE_BYTES = 64 * 1024


def fingerprint(key: Ed25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key, hex: how a key is named in signatures and results."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_key(path: Path) -> Path:
    """Write a new private key to ``path`` (mode 0600) and its public key to ``path.pub``; return the latter."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if path.exists():
        raise ConfigError(f"{path} already exists; not overwriting a key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    public_path = path.with_name(path.name + ".pub")
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a readable unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: bundles are signed with Ed25519 keys; this is a {type(key).__name__}")
    return key


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """The Ed25519 public keys in a PEM file (one or more blocks) or in a directory's ``*.pem`` files."""
    files = sorted(path.glob("*.pem")) if path.is_dir() else [path]
    keys: list[Ed25519PublicKey] = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"trusted keys: cannot read {file}: {exc}") from exc
        for block in data.split(_PEM_END)[:-1]:
            try:
                key = serialization.load_pem_public_key(block + _PEM_END)
            except (ValueError, UnsupportedAlgorithm) as exc:
                raise ConfigError(f"trusted keys: {file} holds a PEM block that is not a public key") from exc
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"trusted keys: {file} holds a {type(key).__name__}; only Ed25519 keys sign bundles")
            keys.append(key)
    if not keys:
        raise ConfigError(f"trusted keys: no PEM public key in {path}")
    return keys


def sign_bundle(bundle_dir: Path, key: Ed25519PrivateKey) -> str:
    """Verify the bundle's files, then sign its manifest; returns the key's fingerprint."""
    # Never vouch for a bundle whose files do not match its manifest; the manifest bytes signed are the
    # ones verified (kept as load_bundle reads them), not the file read again.
    verified: list[bytes] = []

    def keep(_path: Path, raw: bytes) -> str:
        verified.append(raw)
        return ""

    load_bundle(bundle_dir, check_signature=keep)
    raw = verified[0]
    document = {
        "algorithm": ALGORITHM,
        "key": fingerprint(key.public_key()),
        "signature": base64.b64encode(key.sign(raw)).decode("ascii"),
    }
    (bundle_dir / SIGNATURE_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return str(document["key"])


def verify_manifest(bundle_dir: Path, manifest_bytes: bytes, trusted: Sequence[Ed25519PublicKey]) -> str:
    """Check ``manifest.sig`` against the trusted keys; returns the signer's fingerprint."""
    signature_path = bundle_dir / SIGNATURE_FILE
    if signature_path.is_symlink() or not signature_path.is_file():
        raise BundleError(
            f"{bundle_dir}: the bundle is not signed ({SIGNATURE_FILE} missing) and this server "
            "serves only bundles signed by a trusted key"
        )
    if signature_path.stat().st_size > _MAX_SIGNATURE_BYTES:
        raise BundleError(f"{bundle_dir}: {SIGNATURE_FILE} is too large to be a signature")
    try:
        document = json.loads(signature_path.read_bytes())
        key_name = str(document["key"])
        signature = base64.b64decode(document["signature"], validate=True)
        algorithm = document["algorithm"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BundleError(f"{bundle_dir}: {SIGNATURE_FILE} is not a valid signature document") from exc
    if algorithm != ALGORITHM:
        raise BundleError(f"{bundle_dir}: signature algorithm {str(algorithm)[:32]!r} is not {ALGORITHM}")
    for key in trusted:
        if fingerprint(key) != key_name:
            continue
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature as exc:
            raise BundleError(
                f"{bundle_dir}: the manifest's signature does not verify with key {key_name[:16]}; "
                "the manifest was changed after signing"
            ) from exc
        return key_name
    raise BundleError(f"{bundle_dir}: signed by key {key_name[:16]}, which is not among this server's trusted keys")


def trusted_signature(trusted: Sequence[Ed25519PublicKey]) -> SignatureCheck:
    """A ``load_bundle`` signature check that accepts only these keys."""

    def check(bundle_dir: Path, manifest_bytes: bytes) -> str:
        return verify_manifest(bundle_dir, manifest_bytes, trusted)

    return check
