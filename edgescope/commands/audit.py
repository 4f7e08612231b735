"""``edgescope audit verify``: check that an audit trail is intact."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("audit", help="check an audit trail written by `serve --audit-log`")
    actions = p.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="exit non-zero if any record was changed, removed or reordered")
    verify.add_argument("path", type=Path)


def run(args: argparse.Namespace) -> int:
    from edgescope.runtime.archive.audit import verify

    verdict = verify(args.path)
    if not verdict.intact:
        print(f"{args.path}: NOT intact after {verdict.records} record(s): {verdict.problem}", file=sys.stderr)
        return 1
    print(f"{args.path}: {verdict.records} record(s), intact; last hash {verdict.last_hash}")
    return 0
