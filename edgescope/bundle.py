"""The bundle on disk: ``manifest.json``, ``model.onnx`` and ``engines/``.

Export writes bundles and the runtime reads them; both go through this module
so the layout and integrity checks live in one place. A bundle is written to
a temporary sibling directory and renamed into place, so a failed export
never leaves a partial bundle behind.

Integrity: the manifest lists every file of the bundle with its sha256 (and
``manifest.sig``, when present, signs the manifest's bytes: see
``edgescope.signing``). Loading refuses a bundle with a file the manifest does
not list, a listed path that leaves the bundle, a symbolic link, or ONNX
external data (tensors kept in other files, which the hashes would not
cover). A consumer reads a file through ``Bundle.read_file``, which checks
the bytes it returns, so what is hashed is what is loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from google.protobuf import json_format

from edgescope.errors import BundleError
from edgescope.v1 import manifest_pb2

if TYPE_CHECKING:
    import onnx

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
ONNX_FILE = "model.onnx"
ENGINES_DIR = "engines"
SCHEMA_VERSION = 1
# A manifest is a few KB; anything near this is not one.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large models stay out of memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(bundle_dir: Path, relative: str) -> manifest_pb2.FileEntry:
    path = bundle_dir / relative
    return manifest_pb2.FileEntry(path=relative, sha256=sha256_file(path), size_bytes=path.stat().st_size)


def manifest_to_json(manifest: manifest_pb2.ModelManifest) -> str:
    return json_format.MessageToJson(manifest, indent=2)


def manifest_from_json(text: str, *, origin: str) -> manifest_pb2.ModelManifest:
    manifest = manifest_pb2.ModelManifest()
    try:
        json_format.Parse(text, manifest)
    except json_format.ParseError as exc:
        raise BundleError(f"{origin}: not a valid edgescope manifest: {exc}") from exc
    if manifest.schema_version != SCHEMA_VERSION:
        raise BundleError(
            f"{origin}: manifest schema version {manifest.schema_version} is not supported "
            f"(this edgescope reads version {SCHEMA_VERSION}); re-export the model"
        )
    return manifest


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle directory whose manifest has been read and whose files verified."""

    path: Path
    manifest: manifest_pb2.ModelManifest
    # Fingerprint of the trusted key that verified the manifest's signature; empty: not verified.
    signer: str = ""

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def onnx_sha256(self) -> str:
        return self._entry(ONNX_FILE).sha256

    def _entry(self, relative: str) -> manifest_pb2.FileEntry:
        for entry in self.manifest.files:
            if entry.path == relative:
                return entry
        raise BundleError(f"{self.path}: manifest lists no {relative}")

    def read_file(self, relative: str) -> bytes:
        """The bytes of a listed file, checked against the manifest's sha256 as they are returned."""
        entry = self._entry(relative)
        data = _read_regular(self.path, entry.path)
        _check_digest(self.path, entry, hashlib.sha256(data).hexdigest())
        return data

    def onnx_bytes(self) -> bytes:
        return self.read_file(ONNX_FILE)


def _check_relative(bundle: Path, relative: str) -> None:
    """A manifest path must name a file inside the bundle: relative, no '..', no odd characters."""
    pure = PurePosixPath(relative)
    if (
        not relative
        or pure.is_absolute()
        or "\\" in relative
        or "\0" in relative
        or any(part in ("", ".", "..") for part in relative.split("/"))
        or relative in (MANIFEST_FILE, SIGNATURE_FILE)
    ):
        raise BundleError(f"{bundle}: manifest path {relative[:200]!r} does not name a file inside the bundle")


def _read_regular(bundle: Path, relative: str) -> bytes:
    """Read a bundle file without following a symbolic link at any level below the bundle."""
    with _open_regular(bundle, relative) as handle:
        return handle.read()


def _sha256_regular(bundle: Path, relative: str) -> str:
    """The sha256 of a bundle file, read as ``_read_regular`` reads it but in chunks: engines stay out of memory."""
    digest = hashlib.sha256()
    with _open_regular(bundle, relative) as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _open_regular(bundle: Path, relative: str) -> Iterator[BinaryIO]:
    _check_relative(bundle, relative)
    current = bundle
    for part in relative.split("/")[:-1]:
        current = current / part
        if current.is_symlink() or not current.is_dir():
            raise BundleError(f"{bundle}: {relative} is not inside a plain directory of the bundle")
    try:
        fd = os.open(bundle / relative, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise BundleError(f"{bundle}: file {relative} listed in the manifest is missing") from exc
    except OSError as exc:  # ELOOP: a symbolic link
        raise BundleError(f"{bundle}: {relative} cannot be read as a regular file ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise BundleError(f"{bundle}: {relative} is not a regular file")
        yield handle


def _check_digest(bundle: Path, entry: manifest_pb2.FileEntry, actual: str) -> None:
    if actual != entry.sha256:
        raise BundleError(
            f"{bundle}: {entry.path} has sha256 {actual[:12]}..., the manifest says "
            f"{entry.sha256[:12]}...; the bundle was altered after export"
        )


def _files_on_disk(bundle: Path) -> set[str]:
    """Every entry below the bundle directory as a POSIX relative path; links refused."""
    found: set[str] = set()
    for root, dirs, files in os.walk(bundle, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(root) / name
            relative = path.relative_to(bundle).as_posix()
            if path.is_symlink():
                raise BundleError(f"{bundle}: {relative} is a symbolic link; a bundle holds only plain files")
            if name in files:
                if not path.is_file():
                    raise BundleError(f"{bundle}: {relative} is not a regular file")
                found.add(relative)
    return found


def check_onnx_self_contained(data: bytes, origin: str) -> None:
    """Refuse an ONNX model that keeps tensors in other files (its hashes would not cover them)."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)  # from bytes: external data is never loaded
    except Exception as exc:  # onnx raises DecodeError and others for bytes that are not a model
        raise BundleError(f"{origin}: not a readable ONNX model ({type(exc).__name__})") from exc
    if any(_external(tensor) for tensor in _tensors(model.graph)):
        raise BundleError(
            f"{origin}: the model keeps tensors in external data files; edgescope bundles need a "
            "self-contained model.onnx (under 2 GB) so every byte is covered by the manifest"
        )


def _external(tensor: onnx.TensorProto) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def read_manifest_bytes(path: Path) -> bytes:
    """The raw bytes of a bundle's manifest: a regular file, not a link, of a sane size."""
    manifest_path = path / MANIFEST_FILE
    if manifest_path.is_symlink():
        raise BundleError(f"{path}: {MANIFEST_FILE} is a symbolic link; a bundle holds only plain files")
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {MANIFEST_FILE}; is this an edgescope bundle?")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
    return manifest_path.read_bytes()


# Checks a manifest's signature: (bundle directory, manifest bytes) -> the signer's name, or raises BundleError.
SignatureCheck = Callable[[Path, bytes], str]


def load_bundle(path: Path, *, verify: bool = True, check_signature: SignatureCheck | None = None) -> Bundle:
    """Read a bundle's manifest and check every file against it.

    ``check_signature`` (``edgescope.signing.trusted_signature``) is given the
    very bytes that are then parsed, so what was verified is what is used.
    """
    raw = read_manifest_bytes(path)
    signer = check_signature(path, raw) if check_signature is not None else ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path / MANIFEST_FILE}: not a valid edgescope manifest (not UTF-8 text)") from exc
    manifest = manifest_from_json(text, origin=str(path / MANIFEST_FILE))
    if verify:
        _verify_files(path, manifest)
    return Bundle(path=path, manifest=manifest, signer=signer)


def _verify_files(path: Path, manifest: manifest_pb2.ModelManifest) -> None:
    listed: set[str] = set()
    for entry in manifest.files:
        _check_relative(path, entry.path)
        if entry.path in listed:
            raise BundleError(f"{path}: the manifest lists {entry.path} twice")
        listed.add(entry.path)
    unlisted = _files_on_disk(path) - listed - {MANIFEST_FILE, SIGNATURE_FILE}
    if unlisted:
        shown = ", ".join(sorted(unlisted)[:5])
        raise BundleError(f"{path}: file(s) not listed in the manifest: {shown}; every file of a bundle must be")
    for entry in manifest.files:
        if entry.path == ONNX_FILE:
            data = _read_regular(path, entry.path)
            _check_digest(path, entry, hashlib.sha256(data).hexdigest())
            check_onnx_self_contained(data, f"{path}/{ONNX_FILE}")
        else:
            _check_digest(path, entry, _sha256_regular(path, entry.path))


@contextmanager
def staged_bundle(destination: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``destination`` on success.

    On any exception the staging directory is removed and ``destination`` is
    left as it was.
    """
    if destination.exists() and not overwrite:
        raise BundleError(f"{destination} already exists; pass overwrite to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(staging, destination)


def write_manifest(bundle_dir: Path, manifest: manifest_pb2.ModelManifest) -> None:
    """Record every file in the bundle with its sha256, then write the manifest.

    A signature of the previous manifest no longer holds, so it is removed:
    sign the bundle again (``edgescope sign``) after changing it.
    """
    (bundle_dir / SIGNATURE_FILE).unlink(missing_ok=True)
    del manifest.files[:]
    for file in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        relative = file.relative_to(bundle_dir).as_posix()
        if relative != MANIFEST_FILE:
            manifest.files.append(file_entry(bundle_dir, relative))
    (bundle_dir / MANIFEST_FILE).write_text(manifest_to_json(manifest) + "\n", encoding="utf-8")
