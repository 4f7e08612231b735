"""The ``edgescope`` command: export, serve, stream, models, top, validate, engines, sign, keygen.

Heavy imports happen inside each command, so ``edgescope serve`` on a device
never loads torch and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgescope.errors import ConfigError, EdgescopeError

if TYPE_CHECKING:
    import grpc

    from edgescope.export.tensorrt import EngineOptions
    from edgescope.runtime.backends.base import Backend
    from edgescope.runtime.transport import ClientSecurity

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


def _budget(text: str) -> tuple[str, float]:
    model, sep, value = text.rpartition("=")
    try:
        budget = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} must be MS or MODEL=MS, e.g. 40 or lesion-unet=40") from exc
    return (model if sep else "*"), budget


def _pair(values: list[float], flag: str) -> tuple[float, float]:
    if len(values) != 2:
        raise ConfigError(f"{flag} takes two numbers, MIN,MAX")
    return values[0], values[1]


def _add_client_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection security")
    g.add_argument("--tls-ca", type=Path, help="connect with TLS, trusting this CA certificate (PEM)")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for servers that require one (mTLS)")
    g.add_argument("--tls-key", type=Path, help="the client certificate's private key (PEM)")
    g.add_argument("--token-file", type=Path, help="a file holding the bearer token (default: $EDGESCOPE_TOKEN)")
    g.add_argument("--insecure", action="store_true", help="allow plain text to a non-loopback server")


def _client_security(args: argparse.Namespace) -> ClientSecurity:
    from edgescope.runtime.transport import ClientSecurity, read_client_token

    return ClientSecurity(
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=read_client_token(args.token_file),
        insecure=args.insecure,
    )


def _add_export(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("export", help="export a PyTorch model to a validated bundle")
    p.add_argument("--name", required=True, help="model name the runtime serves it under")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--factory", help="'package.module:build' or 'path/model.py:build' returning the nn.Module")
    p.add_argument("--weights", type=Path, help="state_dict file for the factory's model (loaded weights_only)")
    p.add_argument("--torchscript", type=Path, help="a TorchScript file instead of factory + weights")
    p.add_argument("--exported-program", type=Path, help="a torch.export .pt2 (dynamic batch) instead")
    p.add_argument("--version", default="1")
    p.add_argument("--description", default="")
    p.add_argument("--task", default="segmentation")
    p.add_argument(
        "--precision",
        default="fp32",
        help="fp32, fp16 (graph converted, sensitive ops kept FP32) or int8 (Q/DQ, needs --calibration-data)",
    )
    p.add_argument("--input-size", type=_size, default=(256, 256), metavar="HxW")
    p.add_argument(
        "--color",
        choices=["gray", "rgb", "bgr"],
        help="how frames become the input: gray (default), rgb or bgr; leave out with --channels",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=0,
        metavar="N",
        help="the input's channel count; frames of N channels are taken as sent, without colour conversion "
        "(multi-channel MR or ultrasound, feature maps; --mean/--std give one value per channel)",
    )
    p.add_argument("--resize", default="stretch", choices=["stretch", "letterbox"])
    p.add_argument("--scale", type=float, default=1.0 / 255.0)
    p.add_argument("--mean", type=_floats, default=[], help="subtracted after --scale: one value, or one per channel")
    p.add_argument("--std", type=_floats, default=[], help="divides after --mean: one value, or one per channel")
    p.add_argument(
        "--intensity",
        default="presentation",
        choices=["presentation", "modality", "stored"],
        help="DICOM frames: grey levels as displayed (modality LUT, window, MONOCHROME1), modality values "
        "(e.g. HU) or stored values",
    )
    p.add_argument("--voi", default="", help="DICOM window or VOI LUT the model expects: explanation or position")
    p.add_argument("--labels", default="background,lesion", help="comma-separated, background first")
    p.add_argument("--activation", default="sigmoid", choices=["sigmoid", "softmax", "none"])
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--min-component-pixels", type=int, default=0)
    p.add_argument("--output-name", default="logits", help="the task output (boxes, for detection)")
    p.add_argument(
        "--output",
        default="",
        metavar="NAME|INDEX[,...]",
        help="a model returning a tuple or dict: which returned value is the task output (then detection "
        "scores and next states), by position or name; the others are dropped from the graph",
    )
    p.add_argument(
        "--static-batch",
        action="store_true",
        help="fix the batch axis at one frame, for models that cannot export with a dynamic batch "
        "(no batching across streams)",
    )
    p.add_argument("--previous-frame-input", default="", help="registration: input fed with the previous frame")
    p.add_argument(
        "--state", action="append", default=[], metavar="IN:OUT:D1,D2,..", help="a recurrent state tensor (repeatable)"
    )
    p.add_argument("--scores-output", default="scores", help="detection: the class-score output")
    p.add_argument("--box-format", default="xyxy", choices=["xyxy", "xywh", "cxcywh"])
    p.add_argument("--score-threshold", type=float, default=0.5, help="detection: lowest box score kept")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="detection: NMS overlap limit")
    p.add_argument("--max-boxes", type=int, default=100)
    p.add_argument("--anomaly-threshold", type=float, default=0.01, help="anomaly: score that flags a frame")
    p.add_argument("--heatmap", default="fixed", choices=["fixed", "per-frame"])
    p.add_argument("--heatmap-max", type=float, default=0.1, help="anomaly: error shown at full heat (fixed)")
    p.add_argument("--output-range", type=_floats, default=[0.0, 1.0], help="image: output MIN,MAX mapped to 0..255")
    p.add_argument("--displacement-units", default="pixels", choices=["pixels", "mm"])
    p.add_argument(
        "--data", default="synthetic:ultrasound", help="validation frames: dicom:PATH, video:PATH, synthetic:ultrasound"
    )
    p.add_argument("--samples", type=int, help="frames the gate runs (default: 16 for fp32, 48 for fp16 and int8)")
    _add_limits(p)
    p.add_argument(
        "--golden-frames", type=int, default=8, help="of the gate's frames, how many every device self-tests on"
    )
    p.add_argument(
        "--reference-samples",
        type=int,
        default=96,
        help="frames of --data the domain profile is fitted on: every served frame is scored against it (0: none)",
    )
    p.add_argument(
        "--domain-false-alarm-rate",
        type=float,
        default=1e-3,
        help="share of in-domain frames the profile's threshold may call out of domain",
    )
    p.add_argument("--force", action="store_true", help="write the bundle even if the gate fails (marked failed)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sign-key", type=Path, help="sign the bundle's manifest with this Ed25519 private key (PEM)")
    p.add_argument("--fp32-ops", help="fp16: comma-separated op types kept in FP32 (replaces the default list)")
    p.add_argument("--calibration-data", help="int8: dicom:PATH, video:PATH, synthetic:..., or a folder of images")
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="int8: weights in 7 bits, so onnxruntime's integer kernels on x86 CPUs without VNNI do not saturate",
    )
    p.add_argument(
        "--format", action="append", default=[], choices=["triton"], help="also write a Triton model repository"
    )
    p.add_argument(
        "--engines",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build TensorRT engines (default: when TensorRT and a GPU are present)",
    )
    _add_engine_options(p)


def _add_limits(p: argparse.ArgumentParser) -> None:
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


def _limits(args: argparse.Namespace) -> dict[str, float]:
    """The gate limits given on the command line, by their names in the manifest."""
    given = {name: getattr(args, name) for name in ("max_abs_error", "rtol", "min_dice", "min_frame_dice")}
    return {name: value for name, value in given.items() if value is not None}


def _add_engine_options(p: argparse.ArgumentParser) -> None:
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


def _engine_options(args: argparse.Namespace, precision: str | None) -> EngineOptions:
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


def _run_export(args: argparse.Namespace) -> int:
    from edgescope.export import ExportRequest, export_model
    from edgescope.export.precision import FP16_FP32_OPS
    from edgescope.export.tasks import StateSpec

    export_model(
        ExportRequest(
            name=args.name,
            output=args.out,
            factory=args.factory,
            weights=args.weights,
            torchscript=args.torchscript,
            exported_program=args.exported_program,
            version=args.version,
            description=args.description,
            task=args.task,
            precision=args.precision,
            input_height=args.input_size[0],
            input_width=args.input_size[1],
            color=args.color or ("channels" if args.channels else "gray"),
            channels=args.channels,
            model_outputs=tuple(v.strip() for v in args.output.split(",") if v.strip()),
            static_batch=args.static_batch,
            resize=args.resize,
            scale=args.scale,
            mean=args.mean,
            std=args.std,
            intensity=args.intensity,
            voi=args.voi,
            labels=[v for v in args.labels.split(",") if v],
            activation=args.activation,
            threshold=args.threshold,
            min_component_pixels=args.min_component_pixels,
            output_name=args.output_name,
            previous_frame_input=args.previous_frame_input,
            state=[StateSpec.parse(s) for s in args.state],
            scores_output=args.scores_output,
            box_format=args.box_format,
            score_threshold=args.score_threshold,
            iou_threshold=args.iou_threshold,
            max_boxes=args.max_boxes,
            anomaly_threshold=args.anomaly_threshold,
            heatmap=args.heatmap,
            heatmap_max=args.heatmap_max,
            output_range=_pair(args.output_range, "--output-range"),
            displacement_units=args.displacement_units,
            data=args.data,
            samples=args.samples,
            limits=_limits(args),
            golden_frames=args.golden_frames,
            reference_samples=args.reference_samples,
            domain_false_alarm_rate=args.domain_false_alarm_rate,
            force=args.force,
            overwrite=args.overwrite,
            fp32_ops=tuple(v for v in args.fp32_ops.split(",") if v) if args.fp32_ops is not None else FP16_FP32_OPS,
            calibration_data=args.calibration_data,
            calibration_samples=args.calibration_samples,
            calibration_method=args.calibration_method,
            reduce_range=args.reduce_range,
            formats=("bundle", *args.format),
            engines=args.engines,
            engine_options=_engine_options(args, None),
            sign_key=args.sign_key,
        )
    )
    return 0


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        help="read a source on the server (pull mode); clients call Subscribe",
    )
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


def _run_serve(args: argparse.Namespace) -> int:
    from edgescope.runtime.pipeline.decode import FrameLimits
    from edgescope.runtime.server.app import ServerConfig, serve

    if not args.bundles and args.model_repository is None:
        raise ConfigError(
            "no bundle to serve: give bundle directories (edgescope serve BUNDLE...), "
            "`bundles` in the --config file, or EDGESCOPE_BUNDLES; or a --model-repository to load them from later"
        )
    from edgescope.runtime.server.capture import CaptureConfig
    from edgescope.runtime.server.kserve import TensorLimits
    from edgescope.runtime.server.registry import WorkerOptions
    from edgescope.runtime.server.security import SecurityConfig
    from edgescope.runtime.server.streams import SchedulerConfig
    from edgescope.runtime.telemetry.metrics import TelemetryConfig
    from edgescope.v1 import stream_pb2

    config = ServerConfig(
        bundles=args.bundles,
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        allow_failed_validation=args.allow_failed_validation,
        grace_s=args.grace,
        audit_log=args.audit_log,
        self_test=not args.skip_self_test,
        scheduling=SchedulerConfig(
            policy=stream_pb2.STREAM_POLICY_LIVE if args.policy == "live" else stream_pb2.STREAM_POLICY_EVERY,
            deadline_ms=args.deadline_ms,
            frame_limits=FrameLimits(max_pixels=args.max_frame_pixels, max_extra_models=args.max_extra_models),
        ),
        captures=[CaptureConfig.parse(c) for c in args.capture],
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
    backend = _backend(args.backend, args)
    if args.fallback:
        if args.fallback == args.backend:
            raise ConfigError(f"--fallback {args.fallback} is the primary backend already; name another")
        config.fallback = _backend(args.fallback, args)
    config.models = WorkerOptions(
        instances=args.instances or backend.default_instances,
        max_batch=args.max_batch,
        batch_delay_s=args.batch_delay_ms / 1000.0,
    )
    if args.frame_threads > 0:
        config.frame_threads = args.frame_threads
    asyncio.run(serve(config, backend))
    return 0


def _backend(kind: str, args: argparse.Namespace) -> Backend:
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


def _add_stream(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("stream", help="stream a source to a server and summarise latency")
    p.add_argument(
        "--source",
        required=True,
        help="dicom:PATH[?voi=..] | video:PATH | images:GLOB[?fps=F] | v4l2:/dev/videoN[?width=&height=&fps=&fourcc=] "
        "| rtsp:// rtsps:// http(s):// udp:// srt:// URL | gst:PIPELINE | synthetic:ultrasound | synthetic:endoscopy",
    )
    p.add_argument("--model", default="", help="model name (optional when the server has one)")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--fast", action="store_true", help="send as fast as the server answers, not at the source's rate")
    p.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--loop", action="store_true", help="repeat a finite source")
    p.add_argument("--save", type=Path, help="write an overlay video: .mp4 (H.264), .webm (VP9) or .avi (MJPEG)")
    p.add_argument("--summary", type=Path, help="write the latency summary as JSON")
    p.add_argument(
        "--results-to",
        metavar="URL",
        help="store the results in an archive: dicomweb+http(s)://HOST:PORT/PATH (STOW-RS) or "
        "dicom://CALLED_AET@HOST:PORT (C-STORE); a dicom: source's masks become a DICOM Segmentation",
    )
    _add_outbox(p)
    p.add_argument("--mask-encoding", default="png", choices=["png", "rle"])
    p.add_argument("--policy", choices=["every", "live"], help="live: newest frame wins; every: all frames (default)")
    p.add_argument("--deadline-ms", type=int, default=0, help="per-frame budget from server receipt")
    p.add_argument("--max-message-mb", type=int, default=64)
    _add_client_security(p)


def _add_outbox(p: argparse.ArgumentParser) -> None:
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    p.add_argument(
        "--outbox",
        type=Path,
        default=state / "edgescope" / "outbox",
        help="where DICOM results wait until the archive confirms them (kept across runs)",
    )
    p.add_argument("--delivery-timeout", type=float, default=60.0, help="seconds to keep trying the archive")


def _add_outbox_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("outbox", help="DICOM results waiting for their archive")
    actions = p.add_subparsers(dest="action", required=True)
    send = actions.add_parser("send", help="deliver what waits in the outbox")
    send.add_argument("--results-to", metavar="URL", required=True, help="as for `edgescope stream --results-to`")
    _add_outbox(send)


def _run_outbox(args: argparse.Namespace) -> int:
    from edgescope.runtime.archive.outbox import Outbox
    from edgescope.runtime.archive.senders import sender_for

    delivery = Outbox(args.outbox).deliver(sender_for(args.results_to), args.delivery_timeout)
    print(f"delivered {len(delivery.sent)} object(s) to {args.results_to}; {delivery.waiting} still waiting")
    if delivery.waiting:
        print(f"edgescope outbox: {delivery.last_error}", file=sys.stderr)
    return 1 if delivery.waiting else 0


def _run_stream(args: argparse.Namespace) -> int:
    from edgescope.runtime.client.stream import StreamOptions, stream_source
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
        policy={"live": stream_pb2.STREAM_POLICY_LIVE, "every": stream_pb2.STREAM_POLICY_EVERY}.get(
            args.policy or "", stream_pb2.STREAM_POLICY_UNSPECIFIED
        ),
        deadline_ms=args.deadline_ms,
        security=_client_security(args),
    )
    recorder = None
    if args.results_to:
        from edgescope.runtime.archive.senders import sender_for
        from edgescope.runtime.client.archive import SegmentationRecorder, dicom_path

        sender_for(args.results_to)  # a wrong URL fails before the stream, not after it
        recorder = SegmentationRecorder(dicom_path(args.source))
    with open_source(args.source, loop=args.loop) as source:
        pace = "as fast as possible" if args.fast else f"at {source.fps:.1f} fps"
        print(f"streaming {args.source} to {args.target} {pace}")
        report = asyncio.run(stream_source(source, options, recorder.observe if recorder is not None else None))
    archive = None
    if recorder is not None:
        from edgescope.runtime.archive.outbox import Outbox

        archive = recorder.deliver(args.results_to, Outbox(args.outbox), args.delivery_timeout)
        print(
            f"results: {len(archive['delivered'])} object(s) stored at {args.results_to}, {archive['waiting']} waiting"
        )
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
            "clock": report.clock.as_dict(),
            "rate_warnings": report.rate_warnings,
            "error": report.error,
            **({"archive": archive} if archive is not None else {}),
        }
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"summary: {args.summary}")
    if report.error:
        print(f"edgescope stream: {report.error}", file=sys.stderr)
    if archive is not None and archive["waiting"]:
        print(f"edgescope stream: results still in the outbox: {archive['error']}", file=sys.stderr)
    waiting = archive is not None and archive["waiting"]
    return 1 if report.latency.errors or report.error or waiting else 0


def _add_models(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("models", help="list the models a server has loaded")
    p.add_argument("--target", default=DEFAULT_TARGET)
    _add_client_security(p)


def _run_models(args: argparse.Namespace) -> int:
    from edgescope.runtime.transport import sync_channel
    from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

    with sync_channel(args.target, _client_security(args)) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        response = stub.ListModels(stream_pb2.ListModelsRequest(), timeout=10)
    for model in response.models:
        if not model.ready:
            print(f"{model.name}\tNOT SERVED\t{model.not_ready_reason}")
            continue
        gate = "passed" if model.manifest.validation.passed else "FAILED"
        task = manifest_pb2.Task.Name(model.manifest.task)
        state = f"DEGRADED ({model.provenance.degraded_reason})" if model.provenance.degraded else "serving"
        print(f"{model.name}\t{model.manifest.version}\t{task}\t{model.backend}\tgate {gate}\t{state}")
    return 0


def _add_top(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("top", help="live terminal view of a server's latency and device health")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    p.add_argument("--count", type=int, help="print the view after this many updates and exit")
    _add_client_security(p)


def _run_top(args: argparse.Namespace) -> int:
    from edgescope.runtime.client.top import run_top

    run_top(args.target, args.interval, args.count, security=_client_security(args))
    return 0


def _add_validate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    _add_limits(p)


def _run_validate(args: argparse.Namespace) -> int:
    from edgescope.export.validate import ValidateRequest, self_test_bundle, validate_bundle

    if not (args.factory or args.torchscript):
        if args.weights or args.data or args.samples or _limits(args):
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
            limits=_limits(args),
            golden_frames=args.golden_frames,
        )
    )
    return 0 if bundle.manifest.validation.passed else 1


def _add_engines(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("engines", help="build a TensorRT engine for this GPU into a bundle's engines/")
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", help="engine precision (default: the bundle's; other ones need TensorRT 10)")
    p.add_argument("--calibration-data", help="int8 engine from an fp32 bundle (TensorRT 10): calibration frames")
    p.add_argument("--calibration-samples", type=int, default=32)
    _add_engine_options(p)


def _run_engines(args: argparse.Namespace) -> int:
    from edgescope.bundle import load_bundle
    from edgescope.export.tensorrt import build_engine

    entry = build_engine(load_bundle(args.bundle), _engine_options(args, args.precision))
    print(f"wrote {args.bundle / entry.plan} (sidecar beside it); next: edgescope serve {args.bundle}")
    return 0


def _add_sign(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("sign", help="sign a bundle's manifest with an Ed25519 private key")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM, from edgescope keygen)")


def _run_sign(args: argparse.Namespace) -> int:
    from edgescope.signing import load_private_key, sign_bundle

    signer = sign_bundle(args.bundle, load_private_key(args.key))
    print(f"signed {args.bundle} with key {signer[:16]}; servers trust it with --trusted-keys PUBLIC.pem")
    return 0


def _add_keygen(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    p.add_argument("--out", type=Path, required=True, help="private key file to write (mode 0600); KEY.pub beside it")


def _run_keygen(args: argparse.Namespace) -> int:
    from edgescope.signing import generate_key

    public = generate_key(args.out)
    print(f"private key: {args.out} (keep it off the devices)\npublic key:  {public} (give it to --trusted-keys)")
    return 0


def _with_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser, serve: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.Namespace:
    """serve's options from --config (or EDGESCOPE_CONFIG) and EDGESCOPE_* variables, under its flags."""
    from edgescope.config import apply_config

    config_file = args.config or (Path(os.environ["EDGESCOPE_CONFIG"]) if os.environ.get("EDGESCOPE_CONFIG") else None)
    return apply_config(args, parser, serve, argv, config_file)


def _rpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    import grpc

    # What gRPC raises (sync and asyncio) carries the call's status.
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return exc.code(), exc.details() or ""
    return None


def _error_line(command: str, exc: BaseException, args: argparse.Namespace) -> str:
    """One line that says what went wrong and what to do about it."""
    import grpc

    if isinstance(exc, EdgescopeError):
        return f"edgescope {command}: error: {exc}"
    status = _rpc_status(exc)
    if status is not None:
        code, details = status
        target = getattr(args, "target", "the server")
        if code == grpc.StatusCode.UNAVAILABLE:
            return (
                f"edgescope {command}: error: no server answers at {target} ({details}); "
                "start one with `edgescope serve`, or point --target at it"
            )
        return f"edgescope {command}: error: {target} answered {code.name}: {details}"
    if isinstance(exc, OSError):
        return f"edgescope {command}: error: {exc} (check the path, its permissions, or the address and port)"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"edgescope {command}: error: unexpected {type(exc).__name__}: {first} "
        "(rerun with --debug for the full traceback, and report it)"
    )


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated whole numbers, e.g. 1,2,4") from exc


def _shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be NAME:D1,D2,... (sizes without the batch), e.g. image:1,512,512"
        )
    return name, _ints(dims)


def _add_perf(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "perf",
        help="measure a running server's latency and throughput under load (like perf_analyzer)",
        description="Sweep concurrency (or request rate) against a running server; per step, after a warm-up, "
        "measure windows until they agree, then report throughput and latency percentiles.",
    )
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--model", required=True)
    p.add_argument("--protocol", choices=["kserve", "stream"], default="kserve", help="ModelInfer or edgescope Stream")
    p.add_argument("--concurrency", type=_ints, default=[1], metavar="N,N,...", help="outstanding requests per step")
    p.add_argument("--request-rate", type=_floats, default=[], metavar="R,R,...", help="requests/s per step instead")
    p.add_argument("--distribution", choices=["constant", "poisson"], default="constant", help="request-rate spacing")
    p.add_argument("--batch-size", type=int, default=1, help="kserve: rows per request")
    p.add_argument("--shape", type=_shape, action="append", default=[], metavar="NAME:D1,D2",
                   help="kserve: sizes of an input's dynamic dimensions (without the batch)")  # fmt: skip
    p.add_argument("--source", default="synthetic:ultrasound", help="stream: the frames to send")
    p.add_argument("--stream-lanes", type=int, default=4, help="stream: streams that carry request-rate steps")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--window-s", type=float, default=2.0, help="length of one measurement window")
    p.add_argument("--stability", type=float, default=10.0, help="windows agree within this percentage")
    p.add_argument("--max-windows", type=int, default=10, help="windows per step before giving up on stability")
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument("--json", type=Path, help="write every step as JSON")
    p.add_argument("--csv", type=Path, help="write one row per step as CSV")
    p.add_argument("--plot", type=Path, help="write latency against throughput as PNG (needs matplotlib)")
    _add_client_security(p)


def _run_perf(args: argparse.Namespace) -> int:
    from edgescope.runtime.client.perf import PerfOptions, format_table, run_perf, write_csv, write_json, write_plot

    options = PerfOptions(
        target=args.target,
        model=args.model,
        protocol=args.protocol,
        concurrency=args.concurrency,
        request_rates=args.request_rate,
        distribution=args.distribution,
        batch_size=args.batch_size,
        shapes=dict(args.shape),
        source=args.source,
        stream_lanes=args.stream_lanes,
        warmup_s=args.warmup_s,
        window_s=args.window_s,
        stability=args.stability / 100.0,
        max_windows=args.max_windows,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        security=_client_security(args),
    )
    print(f"perf: {args.model} over {args.protocol} at {args.target}")
    results = asyncio.run(run_perf(options))
    print(format_table(results))
    if args.json is not None:
        write_json(results, options, args.json)
        print(f"json: {args.json}")
    if args.csv is not None:
        write_csv(results, args.csv)
        print(f"csv: {args.csv}")
    if args.plot is not None:
        print(f"plot: {args.plot}" if write_plot(results, options, args.plot) else "plot: skipped (no matplotlib)")
    return 1 if any(step.errors for step in results) else 0


def _add_audit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("audit", help="check an audit trail written by `serve --audit-log`")
    actions = p.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="exit non-zero if any record was changed, removed or reordered")
    verify.add_argument("path", type=Path)


def _run_audit(args: argparse.Namespace) -> int:
    from edgescope.runtime.archive.audit import verify

    verdict = verify(args.path)
    if not verdict.intact:
        print(f"{args.path}: NOT intact after {verdict.records} record(s): {verdict.problem}", file=sys.stderr)
        return 1
    print(f"{args.path}: {verdict.records} record(s), intact; last hash {verdict.last_hash}")
    return 0


def _add_doctor(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("doctor", help="what this device can run and what is missing")
    p.add_argument("bundles", type=Path, nargs="*", help="also check which of these bundles' engines fit this device")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--host", default="127.0.0.1", help="address whose ports to check")
    p.add_argument("--port", type=int, default=8731, help="gRPC port to check")
    p.add_argument("--metrics-port", type=int, default=8732, help="telemetry port to check (-1: skip)")


def _run_doctor(args: argparse.Namespace) -> int:
    from edgescope.runtime.doctor import as_json, format_report, run_checks

    ports = [(args.port, "gRPC")] + ([(args.metrics_port, "page and /metrics")] if args.metrics_port >= 0 else [])
    checks = run_checks(args.bundles, args.host, ports)
    print(json.dumps(as_json(checks), indent=2) if args.json else format_report(checks))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from edgescope import __version__

    parser = argparse.ArgumentParser(prog="edgescope", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgescope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_export,
        _add_serve,
        _add_stream,
        _add_models,
        _add_top,
        _add_validate,
        _add_engines,
        _add_sign,
        _add_keygen,
        _add_doctor,
        _add_audit,
        _add_outbox_command,
        _add_perf,
    ):
        add(commands)
    return parser


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (``serve``), for the options it takes."""
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found: argparse.ArgumentParser = commands.choices[command]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # Our own progress at INFO; libraries (the ONNX exporter is chatty) only warn.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("edgescope").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    runners = {
        "export": _run_export,
        "serve": _run_serve,
        "stream": _run_stream,
        "models": _run_models,
        "top": _run_top,
        "validate": _run_validate,
        "engines": _run_engines,
        "sign": _run_sign,
        "keygen": _run_keygen,
        "doctor": _run_doctor,
        "audit": _run_audit,
        "outbox": _run_outbox,
        "perf": _run_perf,
    }
    try:
        if args.command == "serve":
            args = _with_config(args, parser, command_parser(parser, "serve"), argv)
        return runners[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`edgescope doctor | head`): stop quietly, and keep the exit flush from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (Exception, asyncio.CancelledError) as exc:
        # CancelledError: a call gRPC gave up on (the server went away mid-stream); one line all the same.
        if args.debug:
            traceback.print_exc()
        print(_error_line(args.command, exc, args), file=sys.stderr)
        # 2: the request or its inputs are wrong (edgescope's own errors); 1: something failed on the way.
        return 2 if isinstance(exc, EdgescopeError) else 1


if __name__ == "__main__":
    raise SystemExit(main())
