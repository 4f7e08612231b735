"""``edgescope serve``: serve bundles over gRPC, its options from flags, environment and config file."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from edgescope.commands.options import add_outbox
from edgescope.errors import ConfigError
from edgescope.runtime.archive.key_frames import DEFAULT_MAX_FRAMES, DEFAULT_POLICY

if TYPE_CHECKING:
    from edgescope.runtime.backends.base import Backend
    from edgescope.runtime.server.capture_archive import CaptureResults

T = TypeVar("T")


def _budget(text: str) -> tuple[str, float]:
    model, sep, value = text.rpartition("=")
    try:
        budget = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} must be MS or MODEL=MS, e.g. 40 or lesion-unet=40") from exc
    return (model if sep else "*"), budget


def _per_model(convert: Callable[[str], T], example: str) -> Callable[[str], tuple[str, T]]:
    """A VALUE or MODEL=VALUE option: (model, value), model "*" for every model without its own."""

    def parse(text: str) -> tuple[str, T]:
        model, sep, value = text.rpartition("=")
        try:
            return (model if sep else "*"), convert(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} must be VALUE or MODEL=VALUE, e.g. {example}") from exc

    return parse


def _tta(text: str) -> str:
    if text not in ("off", "flip"):
        raise ValueError(text)
    return text


def _policy(text: str) -> str:
    other = text.removeprefix("fallback:")
    if text not in ("annotate", "withhold") and not (text.startswith("fallback:") and other and "/" not in other):
        raise ValueError(text)
    return text


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "serve",
        help="serve bundles over gRPC",
        description="Serve bundles over gRPC. Every option is also a key of the --config file (TOML or YAML) "
        "and an EDGESCOPE_<OPTION> environment variable; flags override the environment, which overrides the file.",
    )
    p.add_argument("bundles", type=Path, nargs="*", help="bundle directories (or `bundles` in the config file)")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="options from a .toml, .yaml or .yml file (also EDGESCOPE_CONFIG)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8731, help="0 picks a free port (see --port-file)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument(
        "--adaptive-window",
        action="store_true",
        help="let gRPC grow each stream's receive window with the link (clients across a network with a long "
        "round trip); by default it stays at 64 KB, so frames a stream has not read yet wait in the client, "
        "not in the server's memory",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=0,
        help="instances per model, each a session on its own thread (default: the backend's; 1 on the CPU)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime threads per instance (default: the cores divided among the instances)",
    )
    p.add_argument(
        "--intra-op-spinning",
        choices=("auto", "on", "off"),
        default="auto",
        help="whether onnxruntime's threads busy-wait between the operators of a run (never between runs): "
        "auto measures each model both ways at load and keeps the faster (see the log, or `edgescope doctor BUNDLE`)",
    )
    p.add_argument(
        "--frame-threads", type=int, default=0, help="threads for decode and pre/postprocessing (default: the cores)"
    )
    p.add_argument("--allow-failed-validation", action="store_true", help="serve bundles whose accuracy gate failed")
    p.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds SIGTERM leaves frames in flight to finish before they are answered dropped: shutdown",
    )
    p.add_argument(
        "--audit-log",
        type=Path,
        help="append-only, hash-chained record of model loads, refusals, unloads and failovers, with who asked "
        "(check it with `edgescope audit verify PATH`)",
    )
    p.add_argument(
        "--audit-syslog",
        metavar="URL",
        help="also send each audit record to the hospital's audit repository as a DICOM audit message (IHE ATNA): "
        "tls://HOST:PORT[?ca=PEM&cert=PEM&key=PEM] (syslog over TLS, RFC 5425) or tcp://HOST:PORT",
    )
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "tensorrt", "remote"],
        help="onnxruntime (default), tensorrt (the bundle's engines), remote (a Triton/KServe v2 server)",
    )
    p.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="onnxruntime execution providers in order, e.g. TensorrtExecutionProvider,CUDAExecutionProvider",
    )
    p.add_argument(
        "--fallback",
        default="",
        choices=["", "onnxruntime", "tensorrt", "remote"],
        help="a second, self-tested backend that serves a model, flagged degraded, while its primary fails",
    )
    p.add_argument("--remote-url", default="", help="host:port of the Triton/KServe v2 server for --backend remote")
    p.add_argument(
        "--skip-self-test",
        action="store_true",
        help="serve without running each bundle's golden frames here first (experiments; every result says so)",
    )
    p.add_argument(
        "--int8-execution",
        default="integer",
        choices=["integer", "fake-quant"],
        help="onnxruntime, INT8 graphs: this CPU's integer kernels (served only if the self-test passes) "
        "or fake-quant in float (slower, the same on every CPU)",
    )
    p.add_argument("--policy", choices=["every", "live"], default="every", help="default for streams that set none")
    p.add_argument("--deadline-ms", type=int, default=0, help="default per-frame budget from receipt (0: none)")
    p.add_argument("--max-batch", type=int, default=8, help="cross-stream batch size for dynamic-batch models")
    p.add_argument("--batch-delay-ms", type=float, default=0.0, help="how long a frame may wait for a batch")
    p.add_argument(
        "--capture",
        action="append",
        default=[],
        metavar="NAME=SOURCE@MODEL",
        help="read a source on the server (pull mode); clients call Subscribe. For a model fed by several "
        "sources, SOURCE is each SOURCE_NAME=SPEC joined by | (white=synthetic:endoscopy|nir=synthetic:fluorescence)",
    )
    archive = p.add_argument_group("the captures' results to an archive (DICOM; see docs/dicom-results.md)")
    archive.add_argument(
        "--results-to",
        metavar="URL",
        help="store every capture's key frames as Secondary Capture images with their Segmentation or report: "
        "dicomweb+http(s)://HOST:PORT/PATH (STOW-RS) or dicom(s)://CALLED_AET@HOST:PORT (C-STORE; dicoms: over "
        "TLS); over TLS, ?ca=PEM&cert=PEM&key=PEM name the CA to trust and a client certificate",
    )
    archive.add_argument(
        "--study-context",
        type=Path,
        metavar="FILE",
        help="with --results-to: the patient and study the captures' key frames belong to (.json or .toml)",
    )
    archive.add_argument(
        "--key-frames",
        metavar="POLICY",
        help=f"which answered frames to store: every:SECONDS, on-alert, or both comma-separated "
        f"(default {DEFAULT_POLICY})",
    )
    archive.add_argument(
        "--seg-type",
        choices=["binary", "fractional"],
        default="binary",
        help="the key frames' DICOM Segmentation: binary (the masks), or fractional (each label's probability, "
        "8-bit; every captured frame then costs a resize and a PNG per label) (default binary)",
    )
    archive.add_argument(
        "--max-key-frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help=f"key frames per batch: a capture's batch is written when it holds this many, and when its run ends "
        f"(default {DEFAULT_MAX_FRAMES})",
    )
    add_outbox(p)
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the telemetry page and /metrics")
    p.add_argument("--metrics-port", type=int, default=8732, help="telemetry page and /metrics (0: any, -1: off)")
    p.add_argument(
        "--latency-budget-ms",
        type=_budget,
        action="append",
        default=[],
        metavar="[MODEL=]MS",
        help="alert when a frame spends longer in the server (repeat per model)",
    )
    p.add_argument("--telemetry-interval", type=float, default=1.0, help="seconds between device samples")
    p.add_argument("--warmup-frames", type=int, default=0, help="leave each stream's first frames out of latency")
    p.add_argument(
        "--drift-false-alarm-hours",
        type=float,
        default=24.0,
        help="expected time between false domain-drift alerts on an in-domain stream, counted at 30 fps "
        "(sets the drift test's threshold; see docs/input-monitoring.md)",
    )
    p.add_argument(
        "--out-of-domain",
        type=_per_model(_policy, "withhold, lesion-unet=withhold or lesion-unet=fallback:other-model"),
        action="append",
        default=[],
        metavar="[MODEL=]POLICY",
        help="annotate (default: flag and alert), withhold (also remove the quantities of a frame out of domain "
        "or below --min-confidence; Result.withheld says why) or fallback:OTHER (a frame out of domain is answered "
        "by model OTHER; Result.fallback_from names the first); repeat per model",
    )
    p.add_argument(
        "--min-confidence",
        type=_per_model(float, "0.6 or lesion-unet=0.6"),
        action="append",
        default=[],
        metavar="[MODEL=]VALUE",
        help="under --out-of-domain withhold, also withhold answers less sure than this (Result.confidence, 0-1)",
    )
    p.add_argument(
        "--tta",
        type=_per_model(_tta, "flip or lesion-unet=flip"),
        action="append",
        default=[],
        metavar="[MODEL=]MODE",
        help="test-time augmentation: off (default) or flip (segmentation and classification: the frame and its "
        "mirror image in one inference of batch 2, averaged; needs a dynamic batch axis); repeat per model",
    )
    g = p.add_argument_group("security (see README: Security)")
    g.add_argument("--tls-cert", type=Path, help="serve gRPC and the page over TLS with this certificate (PEM)")
    g.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    g.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mutual TLS)")
    g.add_argument(
        "--token-file",
        type=Path,
        help="bearer tokens, lines 'ROLE TOKEN' (read or admin); also $EDGESCOPE_READ_TOKEN/$EDGESCOPE_ADMIN_TOKEN",
    )
    g.add_argument(
        "--insecure", action="store_true", help="allow plain text or no authentication on a non-loopback address"
    )
    g.add_argument("--model-repository", type=Path, help="directory of bundles LoadModel may load, by name")
    g.add_argument(
        "--trusted-keys", type=Path, help="Ed25519 public keys (PEM file or directory): serve only bundles they signed"
    )
    g.add_argument(
        "--allowed-hosts", default="", help="Host names the page answers, comma-separated (default: loopback names)"
    )
    g.add_argument("--max-frame-pixels", type=int, default=40_000_000, help="largest frame, checked before decoding")
    g.add_argument("--max-extra-models", type=int, default=4, help="extra models one frame may ask for")
    g.add_argument("--kserve-max-tensor-mb", type=int, default=64, help="input tensors of one KServe request, in MiB")


def _capture_results(args: argparse.Namespace) -> CaptureResults | None:
    """Where the captures' results go (--results-to), checked before anything is served; None without it."""
    if not args.results_to:
        if args.study_context is not None or args.key_frames is not None or args.seg_type != "binary":
            raise ConfigError(
                "--study-context, --key-frames and --seg-type say how results are stored: give --results-to URL"
            )
        return None
    from edgescope.runtime.archive.key_frames import parse_key_frames
    from edgescope.runtime.archive.senders import sender_for
    from edgescope.runtime.archive.study import load_study_context
    from edgescope.runtime.server.capture_archive import CaptureResults

    if not args.capture:
        raise ConfigError("--results-to stores the results of the server's captures: give --capture NAME=SOURCE@MODEL")
    sender_for(args.results_to)  # a wrong URL fails before serving, not with the first batch
    if args.study_context is None:
        raise ConfigError(
            "--results-to needs --study-context FILE: the patient and study the captures' key frames are stored in"
        )
    return CaptureResults(
        url=args.results_to,
        study=load_study_context(args.study_context),
        policy=parse_key_frames(args.key_frames or DEFAULT_POLICY, args.max_key_frames),
        outbox=args.outbox,
        delivery_timeout_s=args.delivery_timeout,
        seg_type=args.seg_type,
    )


def run(args: argparse.Namespace) -> int:
    from edgescope.runtime.pipeline.decode import FrameLimits
    from edgescope.runtime.server.app import ServerConfig, serve

    if not args.bundles and args.model_repository is None:
        raise ConfigError(
            "no bundle to serve: give bundle directories (edgescope serve BUNDLE...), "
            "`bundles` in the --config file, or EDGESCOPE_BUNDLES; or a --model-repository to load them from later"
        )
    from edgescope.runtime.server.capture import CaptureConfig
    from edgescope.runtime.server.kserve_tensors import TensorLimits
    from edgescope.runtime.server.registry import MonitoringOptions, WorkerOptions
    from edgescope.runtime.server.security import SecurityConfig
    from edgescope.runtime.server.streams import SchedulerConfig
    from edgescope.runtime.telemetry.metrics import TelemetryConfig
    from edgescope.v1 import stream_pb2

    config = ServerConfig(
        bundles=args.bundles,
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        adaptive_window=args.adaptive_window,
        allow_failed_validation=args.allow_failed_validation,
        grace_s=args.grace,
        audit_log=args.audit_log,
        audit_syslog=args.audit_syslog,
        monitoring=MonitoringOptions(
            drift_false_alarm_hours=args.drift_false_alarm_hours,
            out_of_domain=dict(args.out_of_domain),
            min_confidence=dict(args.min_confidence),
            tta=dict(args.tta),
        ),
        self_test=not args.skip_self_test,
        scheduling=SchedulerConfig(
            policy=stream_pb2.STREAM_POLICY_LIVE if args.policy == "live" else stream_pb2.STREAM_POLICY_EVERY,
            deadline_ms=args.deadline_ms,
            frame_limits=FrameLimits(max_pixels=args.max_frame_pixels, max_extra_models=args.max_extra_models),
        ),
        captures=[CaptureConfig.parse(c) for c in args.capture],
        capture_results=_capture_results(args),
        port_file=args.port_file,
        telemetry=TelemetryConfig(
            interval_s=args.telemetry_interval,
            http_host=args.metrics_host,
            http_port=None if args.metrics_port < 0 else args.metrics_port,
            latency_budget_ms=dict(args.latency_budget_ms),
            warmup_frames=args.warmup_frames,
        ),
        security=SecurityConfig(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            token_file=args.token_file,
            insecure=args.insecure,
            model_repository=args.model_repository,
            trusted_keys=args.trusted_keys,
            allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        ),
        # One largest batch everywhere: what a KServe request may carry is what a batch may hold.
        kserve_limits=TensorLimits(max_batch=args.max_batch, max_request_bytes=args.kserve_max_tensor_mb * 1024 * 1024),
    )
    backend = backend_for(args.backend, args)
    if args.fallback:
        if args.fallback == args.backend:
            raise ConfigError(f"--fallback {args.fallback} is the primary backend already; name another")
        config.fallback = backend_for(args.fallback, args)
    config.models = WorkerOptions(
        instances=args.instances or backend.default_instances,
        max_batch=args.max_batch,
        batch_delay_s=args.batch_delay_ms / 1000.0,
    )
    if args.frame_threads > 0:
        config.frame_threads = args.frame_threads
    asyncio.run(serve(config, backend))
    return 0


def backend_for(kind: str, args: argparse.Namespace) -> Backend:
    """The backend asked for; never a silent fallback to another device."""
    if kind == "tensorrt":
        from edgescope.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend()
    if kind == "remote":
        if not args.remote_url:
            raise ConfigError("the remote backend needs --remote-url HOST:PORT")
        from edgescope.runtime.backends.remote import RemoteBackend

        return RemoteBackend(args.remote_url)
    from edgescope.runtime.backends.onnxruntime import FAKE_QUANT, INTEGER, OnnxRuntimeBackend

    # ONNX Runtime as the fallback keeps to the CPU: the primary is the accelerator that failed.
    providers = args.providers if kind == args.backend else "CPUExecutionProvider"
    return OnnxRuntimeBackend(
        providers=[p for p in providers.split(",") if p],
        intra_op_threads=args.intra_op_threads or None,
        instances=args.instances or OnnxRuntimeBackend.default_instances,
        int8_execution=FAKE_QUANT if args.int8_execution == "fake-quant" else INTEGER,
        spinning=args.intra_op_spinning,
    )


def with_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser, serve: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.Namespace:
    """serve's options from --config (or EDGESCOPE_CONFIG) and EDGESCOPE_* variables, under its flags."""
    from edgescope.config import apply_config

    config_file = args.config or (Path(os.environ["EDGESCOPE_CONFIG"]) if os.environ.get("EDGESCOPE_CONFIG") else None)
    return apply_config(args, parser, serve, argv, config_file)
