"""The ``edgescope`` command: export, serve, stream, models.

Heavy imports happen inside each command, so ``edgescope serve`` on a device
never loads torch and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edgescope.errors import ConfigError, EdgescopeError

DEFAULT_TARGET = "127.0.0.1:8731"


def _size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit():
        raise argparse.ArgumentTypeError(f"size {text!r} must look like HEIGHTxWIDTH, e.g. 256x256")
    return int(height), int(width)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers") from exc


def _add_export(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("export", help="export a PyTorch model to a validated bundle")
    p.add_argument("--name", required=True, help="model name the runtime serves it under")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--factory", help="'package.module:build' or 'path/model.py:build' returning the nn.Module")
    p.add_argument("--weights", type=Path, help="state_dict file for the factory's model (loaded weights_only)")
    p.add_argument("--torchscript", type=Path, help="a TorchScript file instead of factory + weights")
    p.add_argument("--version", default="1")
    p.add_argument("--description", default="")
    p.add_argument("--task", default="segmentation")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--input-size", type=_size, default=(256, 256), metavar="HxW")
    p.add_argument("--color", default="gray", choices=["gray", "rgb", "bgr"])
    p.add_argument("--resize", default="stretch", choices=["stretch", "letterbox"])
    p.add_argument("--scale", type=float, default=1.0 / 255.0)
    p.add_argument("--mean", type=_floats, default=[])
    p.add_argument("--std", type=_floats, default=[])
    p.add_argument("--labels", default="background,lesion", help="comma-separated, background first")
    p.add_argument("--activation", default="sigmoid", choices=["sigmoid", "softmax", "none"])
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--min-component-pixels", type=int, default=0)
    p.add_argument(
        "--data", default="synthetic:ultrasound", help="validation frames: dicom:PATH, video:PATH, synthetic:ultrasound"
    )
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-abs-error", type=float, default=1e-3)
    p.add_argument("--min-dice", type=float, default=0.99)
    p.add_argument("--force", action="store_true", help="write the bundle even if the gate fails (marked failed)")
    p.add_argument("--overwrite", action="store_true")


def _run_export(args: argparse.Namespace) -> int:
    from edgescope.export import ExportRequest, export_model
    from edgescope.export.validation import GateThresholds

    export_model(
        ExportRequest(
            name=args.name,
            output=args.out,
            factory=args.factory,
            weights=args.weights,
            torchscript=args.torchscript,
            version=args.version,
            description=args.description,
            task=args.task,
            precision=args.precision,
            input_height=args.input_size[0],
            input_width=args.input_size[1],
            color=args.color,
            resize=args.resize,
            scale=args.scale,
            mean=args.mean,
            std=args.std,
            labels=[v for v in args.labels.split(",") if v],
            activation=args.activation,
            threshold=args.threshold,
            min_component_pixels=args.min_component_pixels,
            data=args.data,
            samples=args.samples,
            thresholds=GateThresholds(max_abs_error=args.max_abs_error, min_dice=args.min_dice),
            force=args.force,
            overwrite=args.overwrite,
        )
    )
    return 0


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("serve", help="serve bundles over gRPC")
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8731, help="0 picks a free port (see --port-file)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="frame worker threads (default: CPU count, at least 2)")
    p.add_argument("--allow-failed-validation", action="store_true", help="serve bundles whose accuracy gate failed")


def _run_serve(args: argparse.Namespace) -> int:
    from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgescope.runtime.server import ServerConfig, serve

    config = ServerConfig(
        bundles=args.bundles,
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        allow_failed_validation=args.allow_failed_validation,
        port_file=args.port_file,
    )
    if args.workers > 0:
        config.workers = args.workers
    asyncio.run(serve(config, OnnxRuntimeBackend()))
    return 0


def _add_stream(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("stream", help="stream a source to a server and summarise latency")
    p.add_argument("--source", required=True, help="dicom:PATH | video:PATH | synthetic:ultrasound")
    p.add_argument("--model", default="", help="model name (optional when the server has one)")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--fast", action="store_true", help="send as fast as the server answers, not at the source's rate")
    p.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--loop", action="store_true", help="repeat a finite source")
    p.add_argument("--save", type=Path, help="write an overlay video (.mp4 or .avi)")
    p.add_argument("--summary", type=Path, help="write the latency summary as JSON")
    p.add_argument("--mask-encoding", default="png", choices=["png", "rle"])
    p.add_argument("--max-message-mb", type=int, default=64)


def _run_stream(args: argparse.Namespace) -> int:
    from edgescope.runtime.client import StreamOptions, stream_source
    from edgescope.runtime.sources import open_source
    from edgescope.v1 import stream_pb2

    options = StreamOptions(
        target=args.target,
        model=args.model,
        realtime=not args.fast,
        max_frames=args.frames,
        save=args.save,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        mask_encoding=stream_pb2.MASK_ENCODING_RLE if args.mask_encoding == "rle" else stream_pb2.MASK_ENCODING_PNG,
    )
    with open_source(args.source, loop=args.loop) as source:
        pace = "as fast as possible" if args.fast else f"at {source.fps:.1f} fps"
        print(f"streaming {args.source} to {args.target} {pace}")
        report = asyncio.run(stream_source(source, options))
    print(report.latency.format_table())
    if report.video is not None:
        print(f"overlay video: {report.video}")
    if args.summary is not None:
        summary = {
            "source": args.source,
            "target": args.target,
            "model": args.model,
            "sent": report.sent,
            "realtime": not args.fast,
            **report.latency.as_dict(),
        }
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"summary: {args.summary}")
    return 1 if report.latency.errors else 0


def _add_models(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("models", help="list the models a server has loaded")
    p.add_argument("--target", default=DEFAULT_TARGET)


def _run_models(args: argparse.Namespace) -> int:
    import grpc

    from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

    with grpc.insecure_channel(args.target) as channel:
        response = stream_pb2_grpc.StreamServiceStub(channel).ListModels(stream_pb2.ListModelsRequest(), timeout=10)
    for model in response.models:
        gate = "passed" if model.manifest.validation.passed else "FAILED"
        task = manifest_pb2.Task.Name(model.manifest.task)
        print(f"{model.name}\t{model.manifest.version}\t{task}\t{model.backend}\tgate {gate}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgescope", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_export, _add_serve, _add_stream, _add_models):
        add(commands)
    args = parser.parse_args(argv)
    # Our own progress at INFO; libraries (the ONNX exporter is chatty) only warn.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("edgescope").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    runners = {"export": _run_export, "serve": _run_serve, "stream": _run_stream, "models": _run_models}
    try:
        return runners[args.command](args)
    except (EdgescopeError, ConfigError) as exc:
        print(f"edgescope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
