"""Which bundles a server may load: its model repository and its bundle policy.

``LoadModel`` names a bundle; it never passes a path. The name must be one
directory directly under ``--model-repository``; a name with a separator,
``..`` or odd characters is refused, and a repository entry that is a
symbolic link may point only to another directory inside the repository.

``BundlePolicy`` is the server's own rule for every bundle it opens, at start
and on ``LoadModel`` alike: every file verified (``edgescope.bundle``), the
manifest signed by a trusted key when ``--trusted-keys`` is given, and a
bundle that failed its accuracy gate served only with
``--allow-failed-validation`` (its results then say so in
``Provenance.failed_validation``). No request field can relax it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgescope.bundle import MANIFEST_FILE, Bundle, load_bundle
from edgescope.errors import BundleError, ConfigError, ModelNotFoundError
from edgescope.runtime.server.grpc_status import echo
from edgescope.signing import trusted_signature

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# One path component of portable characters, not starting with a dot.
_BUNDLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")


@dataclass(frozen=True, slots=True)
class BundlePolicy:
    # None: signatures are not required. Otherwise one of these keys must have signed the manifest.
    trusted_keys: Sequence[Ed25519PublicKey] | None = None
    allow_failed_validation: bool = False

    def open(self, path: Path) -> Bundle:
        """Load and verify a bundle, or say which rule it breaks."""
        check = trusted_signature(self.trusted_keys) if self.trusted_keys is not None else None
        bundle = load_bundle(path, check_signature=check)
        if not bundle.manifest.validation.passed and not self.allow_failed_validation:
            # A forced export is kept for investigation, not for patients.
            raise BundleError(
                f"{path}: this bundle failed its accuracy gate at export; this server serves such "
                "bundles only when started with --allow-failed-validation"
            )
        return bundle


@dataclass(frozen=True, slots=True)
class ModelRepository:
    """Bundle names -> bundle directories under one root; ``root`` None: no LoadModel at all."""

    root: Path | None
    policy: BundlePolicy = field(default_factory=BundlePolicy)

    def names(self) -> list[str]:
        """Every bundle the repository holds, loaded or not (entries that look like bundles)."""
        if self.root is None:
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if _BUNDLE_NAME.fullmatch(entry.name) and (entry / MANIFEST_FILE).is_file()
        )

    def resolve(self, name: str) -> Path:
        if self.root is None:
            raise BundleError("this server has no model repository (--model-repository): it loads no bundle on request")
        if not _BUNDLE_NAME.fullmatch(name) or ".." in name:
            raise ConfigError(
                f"bundle name {echo(name)} is not a bundle name: one directory under the model repository, "
                "letters, digits and . _ + - only"
            )
        root = self.root.resolve(strict=True)
        entry = root / name
        if not entry.exists():
            raise ModelNotFoundError(f"no bundle {echo(name)} in the model repository")
        target = entry.resolve(strict=True)
        if target == root or root not in target.parents:
            raise BundleError(f"bundle {echo(name)} is a link that leaves the model repository; refused")
        if not target.is_dir():
            raise ModelNotFoundError(f"{echo(name)} in the model repository is not a bundle directory")
        return target


def check_repository(root: Path) -> Path:
    """Fail at start, not at the first LoadModel, when the repository is not a directory."""
    if not root.is_dir():
        raise ConfigError(f"--model-repository {root} is not a directory")
    return root
