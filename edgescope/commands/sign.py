"""``edgescope sign``: sign a bundle's manifest with an Ed25519 private key."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("sign", help="sign a bundle's manifest with an Ed25519 private key")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM, from edgescope keygen)")


def run(args: argparse.Namespace) -> int:
    from edgescope.signing import load_private_key, sign_bundle

    signer = sign_bundle(args.bundle, load_private_key(args.key))
    print(f"signed {args.bundle} with key {signer[:16]}; servers trust it with --trusted-keys PUBLIC.pem")
    return 0
