"""Options that several commands share: client connection security, the gate's limits, TensorRT
engine options, the results outbox, and the argument types they parse with."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgescope.export.tensorrt import EngineOptions
    from edgescope.runtime.transport import ClientSecurity

DEFAULT_TARGET = "127.0.0.1:8731"


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers") from exc


def add_client_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection security")
    g.add_argument("--tls-ca", type=Path, help="connect with TLS, trusting this CA certificate (PEM)")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for servers that require one (mTLS)")
    g.add_argument("--tls-key", type=Path, help="the client certificate's private key (PEM)")
    g.add_argument("--token-file", type=Path, help="a file holding the bearer token (default: $EDGESCOPE_TOKEN)")
    g.add_argument("--insecure", action="store_true", help="allow plain text to a non-loopback server")


def client_security(args: argparse.Namespace) -> ClientSecurity:
    from edgescope.runtime.transport import ClientSecurity, read_client_token

    return ClientSecurity(
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=read_client_token(args.token_file),
        insecure=args.insecure,
    )


def add_gate_limits(p: argparse.ArgumentParser) -> None:
    # A limit given is used as given; one not given is the precision's default (the README's Precision section).
    p.add_argument(
        "--atol",
        "--max-abs-error",
        dest="max_abs_error",
        type=float,
        help="absolute tolerance: every raw output element within atol + rtol * |reference| (FP32 default 1e-3)",
    )
    p.add_argument("--rtol", type=float, help="relative tolerance of every raw output element (FP32 default 1e-3)")
    p.add_argument("--min-dice", type=float, help="segmentation: mean Dice over the frames (FP32 default 0.99)")
    p.add_argument("--min-frame-dice", type=float, help="segmentation: Dice every frame must reach (FP32 default 0.99)")


def gate_limits(args: argparse.Namespace) -> dict[str, float]:
    """The gate limits given on the command line, by their names in the manifest."""
    given = {name: getattr(args, name) for name in ("max_abs_error", "rtol", "min_dice", "min_frame_dice")}
    return {name: value for name, value in given.items() if value is not None}


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-batch", type=int, default=1, help="TensorRT profile: smallest batch")
    p.add_argument("--opt-batch", type=int, default=1, help="TensorRT profile: batch to tune for")
    p.add_argument("--max-batch", type=int, default=8, help="TensorRT profile: largest batch")
    p.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT workspace memory pool limit")
    p.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimization level 0..5")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, read and updated")
    p.add_argument("--dla-core", type=int, default=-1, help="build for this DLA core (Jetson); -1: the GPU")
    p.add_argument("--gpu-fallback", action="store_true", help="DLA: let layers DLA cannot run fall back to the GPU")
    p.add_argument(
        "--hardware-compatibility", default="none", choices=["none", "ampere_plus", "same_compute_capability"]
    )
    p.add_argument("--version-compatible", action="store_true", help="engine runs on later TensorRT of its major")
    p.add_argument("--force-engine", action="store_true", help="keep an engine that fails its golden frames (marked)")


def engine_options(args: argparse.Namespace, precision: str | None) -> EngineOptions:
    from edgescope.export.tensorrt import EngineOptions

    return EngineOptions(
        precision=precision,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_mib=args.workspace_mib,
        optimization_level=args.optimization_level,
        timing_cache=args.timing_cache,
        dla_core=args.dla_core,
        gpu_fallback=args.gpu_fallback,
        hardware_compatibility=args.hardware_compatibility,
        version_compatible=args.version_compatible,
        calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples,
        force=args.force_engine,
    )


def add_outbox(p: argparse.ArgumentParser) -> None:
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    p.add_argument(
        "--outbox",
        type=Path,
        default=state / "edgescope" / "outbox",
        help="where DICOM results wait until the archive confirms them (kept across runs)",
    )
    p.add_argument("--delivery-timeout", type=float, default=60.0, help="seconds to keep trying the archive")
