"""The bundle on disk: ``manifest.json``, ``model.onnx`` and ``engines/``.

Export writes bundles and the runtime reads them; both go through this module
so the layout and integrity checks live in one place. A bundle is written to
a temporary sibling directory and renamed into place, so a failed export
never leaves a partial bundle behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from edgescope.errors import BundleError
from edgescope.v1 import manifest_pb2

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
ENGINES_DIR = "engines"
SCHEMA_VERSION = 1

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

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def onnx_sha256(self) -> str:
        for entry in self.manifest.files:
            if entry.path == ONNX_FILE:
                return entry.sha256
        raise BundleError(f"{self.path}: manifest lists no {ONNX_FILE}")


def load_bundle(path: Path, *, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and check every listed file against its sha256."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {MANIFEST_FILE}; is this an edgescope bundle?")
    manifest = manifest_from_json(manifest_path.read_text(encoding="utf-8"), origin=str(manifest_path))
    if verify:
        for entry in manifest.files:
            file_path = path / entry.path
            if not file_path.is_file():
                raise BundleError(f"{path}: file {entry.path} listed in the manifest is missing")
            actual = sha256_file(file_path)
            if actual != entry.sha256:
                raise BundleError(
                    f"{path}: {entry.path} has sha256 {actual[:12]}..., the manifest says "
                    f"{entry.sha256[:12]}...; the bundle was altered after export"
                )
    return Bundle(path=path, manifest=manifest)


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
    """Record every file in the bundle with its sha256, then write the manifest."""
    del manifest.files[:]
    for file in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        relative = file.relative_to(bundle_dir).as_posix()
        if relative != MANIFEST_FILE:
            manifest.files.append(file_entry(bundle_dir, relative))
    (bundle_dir / MANIFEST_FILE).write_text(manifest_to_json(manifest) + "\n", encoding="utf-8")
