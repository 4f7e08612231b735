"""``edgescope keygen``: an Ed25519 key pair for signing bundles."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    p.add_argument("--out", type=Path, required=True, help="private key file to write (mode 0600); KEY.pub beside it")


def run(args: argparse.Namespace) -> int:
    from edgescope.signing import generate_key

    public = generate_key(args.out)
    print(f"private key: {args.out} (keep it off the devices)\npublic key:  {public} (give it to --trusted-keys)")
    return 0
