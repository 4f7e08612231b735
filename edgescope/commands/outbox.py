"""``edgescope outbox send``: deliver the DICOM results still waiting for their archive."""

from __future__ import annotations

import argparse
import sys

from edgescope.commands.options import add_outbox


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("outbox", help="DICOM results waiting for their archive")
    actions = p.add_subparsers(dest="action", required=True)
    send = actions.add_parser("send", help="deliver what waits in the outbox")
    send.add_argument("--results-to", metavar="URL", required=True, help="as for `edgescope stream --results-to`")
    add_outbox(send)


def run(args: argparse.Namespace) -> int:
    from edgescope.runtime.archive.outbox import Outbox
    from edgescope.runtime.archive.senders import sender_for

    delivery = Outbox(args.outbox).deliver(sender_for(args.results_to), args.delivery_timeout)
    print(f"delivered {len(delivery.sent)} object(s) to {args.results_to}; {delivery.waiting} still waiting")
    if delivery.waiting:
        print(f"edgescope outbox: {delivery.last_error}", file=sys.stderr)
    return 1 if delivery.waiting else 0
