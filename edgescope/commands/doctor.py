"""``edgescope doctor``: what this device can run and what is missing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("doctor", help="what this device can run and what is missing")
    p.add_argument("bundles", type=Path, nargs="*", help="also check which of these bundles' engines fit this device")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--host", default="127.0.0.1", help="address whose ports to check")
    p.add_argument("--port", type=int, default=8731, help="gRPC port to check")
    p.add_argument("--metrics-port", type=int, default=8732, help="telemetry port to check (-1: skip)")


def run(args: argparse.Namespace) -> int:
    from edgescope.runtime.doctor import as_json, format_report, run_checks

    ports = [(args.port, "gRPC")] + ([(args.metrics_port, "page and /metrics")] if args.metrics_port >= 0 else [])
    checks = run_checks(args.bundles, args.host, ports)
    print(json.dumps(as_json(checks), indent=2) if args.json else format_report(checks))
    return 0
