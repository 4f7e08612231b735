"""``edgescope engines``: a TensorRT engine for this GPU, built into a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgescope.commands.options import add_engine_options, engine_options


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("engines", help="build a TensorRT engine for this GPU into a bundle's engines/")
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", help="engine precision (default: the bundle's; other ones need TensorRT 10)")
    p.add_argument("--calibration-data", help="int8 engine from an fp32 bundle (TensorRT 10): calibration frames")
    p.add_argument("--calibration-samples", type=int, default=32)
    add_engine_options(p)


def run(args: argparse.Namespace) -> int:
    from edgescope.bundle import load_bundle
    from edgescope.export.tensorrt import build_engine

    entry = build_engine(load_bundle(args.bundle), engine_options(args, args.precision))
    print(f"wrote {args.bundle / entry.plan} (sidecar beside it); next: edgescope serve {args.bundle}")
    return 0
