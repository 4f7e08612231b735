"""``edgescope validate``: a bundle's golden frames on this device, or its accuracy gate re-run."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgescope.commands.options import add_gate_limits, gate_limits
from edgescope.errors import ConfigError


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "validate",
        help="check a bundle: its golden frames here, or (given the model) re-run the gate and save it",
        description="Without a model: run the bundle's golden frames through ONNX Runtime here against their "
        "stored outputs (no torch, nothing saved). With --factory or --torchscript: re-run the accuracy gate "
        "against that PyTorch model and save the report and fresh golden frames. Code named in a manifest is "
        "never run.",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--factory", help="the PyTorch model: 'package.module:build' or 'path/model.py:build'")
    p.add_argument("--weights", type=Path, help="its state_dict (default: the file the manifest records, if unchanged)")
    p.add_argument("--torchscript", type=Path)
    p.add_argument("--data", help="where the gate's frames come from (default: where the export's came from)")
    p.add_argument("--samples", type=int, help="how many frames the gate runs (default: 16 for fp32, 48 below)")
    p.add_argument("--golden-frames", type=int, default=8, help="of the gate's frames, how many the bundle keeps")
    add_gate_limits(p)


def run(args: argparse.Namespace) -> int:
    from edgescope.export.validate import ValidateRequest, self_test_bundle, validate_bundle

    if not (args.factory or args.torchscript):
        if args.weights or args.data or args.samples or gate_limits(args):
            # The golden frames are judged by the limits the bundle carries; these options belong to the gate.
            raise ConfigError(
                "--weights, --data, --samples and the limits re-run the gate, which needs --factory or --torchscript"
            )
        reports = self_test_bundle(args.bundle)
        return 0 if reports[0].passed else 1
    bundle = validate_bundle(
        ValidateRequest(
            bundle=args.bundle,
            factory=args.factory,
            weights=args.weights,
            torchscript=args.torchscript,
            data=args.data,
            samples=args.samples,
            limits=gate_limits(args),
            golden_frames=args.golden_frames,
        )
    )
    return 0 if bundle.manifest.validation.passed else 1
