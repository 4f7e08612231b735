"""``edgescope top``: a live terminal view of a server's latency and device health."""

from __future__ import annotations

import argparse

from edgescope.commands.options import DEFAULT_TARGET, add_client_security, client_security


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("top", help="live terminal view of a server's latency and device health")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    p.add_argument("--count", type=int, help="print the view after this many updates and exit")
    add_client_security(p)


def run(args: argparse.Namespace) -> int:
    from edgescope.runtime.client.top import run_top

    run_top(args.target, args.interval, args.count, security=client_security(args))
    return 0
