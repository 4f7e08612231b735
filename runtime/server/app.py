"""The grpc.aio server: who owns what, how it starts, and how it stops.

The server owns a model registry (each model with its worker and instance
threads), the frame threads (decode, pre- and postprocessing), one loader
thread (reading, checking and warming up bundles, so a LoadModel never
delays frames), the registry of streams, telemetry and the captures.

Stopping drains: health turns NOT_SERVING and new streams are refused;
frames read from then on are answered ``dropped: shutdown`` while frames
already in flight finish; after ``grace_s`` whatever is still in flight is
answered ``dropped: shutdown``; each stream ends with a status saying what
happened; only then do the workers finish and close their sessions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgescope import __version__
from edgescope.errors import BundleError, ConfigError, EdgescopeError
from edgescope.runtime.archive.atna import open_trail
from edgescope.runtime.backends.base import Backend, cpu_cores
from edgescope.runtime.render.overlay import load_fonts
from edgescope.runtime.server.auth import CallerExecutor
from edgescope.runtime.server.capture import CaptureConfig, CaptureHub, grpc_health_setter
from edgescope.runtime.server.capture_archive import CaptureArchive, CaptureResults
from edgescope.runtime.server.kserve import SERVICE as KSERVE_SERVICE
from edgescope.runtime.server.kserve import KServeSettings, add_kserve_service
from edgescope.runtime.server.kserve_tensors import DEFAULT_TENSOR_LIMITS, TensorLimits
from edgescope.runtime.server.reflection import enable_reflection
from edgescope.runtime.server.registry import ModelRegistry, MonitoringOptions, WorkerOptions
from edgescope.runtime.server.security import SecurityConfig, open_security
from edgescope.runtime.server.service import StreamService
from edgescope.runtime.server.shm import REGIONS
from edgescope.runtime.server.streams import SchedulerConfig
from edgescope.runtime.server.telemetry import TELEMETRY_SERVICE, TelemetryHub, TelemetryServicer
from edgescope.runtime.server.warmup import warm_up
from edgescope.runtime.telemetry.metrics import TelemetryConfig
from edgescope.runtime.transport import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from edgescope.v1 import stream_pb2, stream_pb2_grpc, telemetry_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = stream_pb2.DESCRIPTOR.services_by_name["StreamService"]
# After the drain: at least this long for the last answers to reach their clients, then this long for the
# workers to finish and close their sessions before the process goes without them (2 s past the grace in all).
FLUSH_S = 0.5
CLOSE_S = 1.5
SERVICE_NAME = SERVICE.full_name


@dataclass(slots=True)
class ServerConfig:
    bundles: Sequence[Path]
    host: str = "127.0.0.1"
    port: int = 8731
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Let gRPC grow each stream's receive window to the link's bandwidth-delay product (see server_options).
    adaptive_window: bool = False
    # Threads for decode, pre- and postprocessing; model instances have threads of their own.
    frame_threads: int = field(default_factory=lambda: max(2, cpu_cores()))
    grace_s: float = 5.0
    allow_failed_validation: bool = False
    # A second backend that takes a model over when its primary fails (degraded mode).
    fallback: Backend | None = None
    # Run each bundle's golden frames on this device before serving it (off only for experiments).
    self_test: bool = True
    # Written with the bound port once serving, so callers can use port 0.
    port_file: Path | None = None
    scheduling: SchedulerConfig = field(default_factory=SchedulerConfig)
    models: WorkerOptions = field(default_factory=WorkerOptions)
    captures: Sequence[CaptureConfig] = ()
    # Where the captures' results go as DICOM objects (serve --results-to); None: nowhere.
    capture_results: CaptureResults | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    kserve_limits: TensorLimits = DEFAULT_TENSOR_LIMITS
    # Where model loads, refusals, unloads, failovers and drift alerts are recorded (hash-chained JSON lines).
    audit_log: Path | None = None
    # Where each audit record is also sent, as a DICOM audit message over syslog (archive.atna); None: nowhere.
    audit_syslog: str | None = None
    monitoring: MonitoringOptions = field(default_factory=MonitoringOptions)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's options for the server: message limits, and a fixed receive window unless asked otherwise.

    With its default adaptive window gRPC lets a client put megabytes of frames
    into each of its streams that the server has not read yet (4 MB at the start,
    more once its probes have seen a fast link): frames of a stream that is not
    being read because its window is full, held in the server's memory. With
    the fixed window (64 KB) a frame moves when the stream reads it (gRPC opens
    the window to a message's size once it is asked for), so the server holds a
    stream's window of frames and little more. On loopback this costs nothing
    measurable; across a link with a 2 ms round trip it added ~10 ms to 6 MB
    frames, which ``adaptive_window`` (``serve --adaptive-window``) gives back.
    """
    options = channel_options(config.max_message_bytes)
    if not config.adaptive_window:
        options.append(("grpc.http2.bdp_probe", 0))
    return options


class RunningServer:
    """A started server; ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        registry: ModelRegistry,
        executors: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
        health_servicer: Any,
        service: StreamService,
        captures: CaptureHub | None,
        telemetry: TelemetryHub,
    ) -> None:
        self.server = server
        self.telemetry = telemetry
        self.port = port
        self.registry = registry
        self.service = service
        self._executors = executors
        self._health = health_servicer
        self._captures = captures

    async def stop(self, grace_s: float) -> None:
        """Drain (see the module docstring), then release everything in order, within ``grace_s`` + 2 s.

        Nothing a caller sent can hold the stop longer: a worker still busy when the time is up
        is left to the process's exit (its threads are daemons), with a warning.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        await self._health.enter_graceful_shutdown()
        if self._captures is not None:
            await self._captures.stop()
        if not await self.service.streams.drain(max(0.0, deadline - loop.time())):
            logger.warning("frames still in flight after %.1f s of draining were answered dropped: shutdown", grace_s)
        # Calls whose clients stop reading their last answers are cancelled by gRPC when the time is up.
        await self.server.stop(max(FLUSH_S, deadline - loop.time()))
        await self.service.memory.close()
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)
        # Workers finish what they hold and close their sessions on their own threads; the loop only waits.
        closing = threading.Thread(target=self.registry.close, args=(CLOSE_S,), name="edgescope-close", daemon=True)
        closing.start()
        until = loop.time() + CLOSE_S
        while closing.is_alive() and loop.time() < until:
            await asyncio.sleep(0.02)
        if closing.is_alive():
            logger.warning("a model's worker was still busy %.0f s after the drain; exiting without it", CLOSE_S)
        REGIONS.close()
        self.telemetry.close()
        if self.registry.audit is not None:
            self.registry.audit.append("server_stopped", by="server")
            self.registry.audit.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


MODEL_HEALTH_PREFIX = "edgescope.model."


class HealthBoard:
    """The gRPC health service's answers: the server, and each configured model by name.

    The server is SERVING once started with every model it was told to load served;
    a model that could not be served (its load or self-test failed) is NOT_SERVING
    under ``edgescope.model.<name>``, and so is the server as a whole.
    """

    def __init__(self, servicer: Any, registry: ModelRegistry, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._registry = registry
        self._loop = loop
        # Every model name published so far: one no longer loaded turns NOT_SERVING, not stale SERVING.
        self._named: set[str] = set()

    def refresh(self) -> None:
        """Thread-safe: recompute and publish every status."""
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._publish()))

    async def _publish(self) -> None:
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        # One snapshot of the registry, so the overall status agrees with the per-model ones.
        names, failed = self._registry.names(), self._registry.failed()
        for name in names:
            await self._servicer.set(MODEL_HEALTH_PREFIX + name, serving)
        for name in self._named.difference(names) | set(failed):
            await self._servicer.set(MODEL_HEALTH_PREFIX + name, not_serving)
        self._named.update(names, failed)
        overall = serving if names and not failed else not_serving
        for health_name in ("", SERVICE_NAME):
            await self._servicer.set(health_name, overall)


def _abandon(
    frames: ThreadPoolExecutor,
    loader: ThreadPoolExecutor,
    registry: ModelRegistry,
    telemetry: TelemetryHub,
    error: BaseException,
) -> None:
    """Undo a start that failed before serving (``error`` says why)."""
    for executor in (frames, loader):
        executor.shutdown(wait=False)
    registry.close()
    telemetry.close()
    if registry.audit is not None:
        registry.audit.append("server_start_failed", by="server", reason=str(error) or type(error).__name__)
        registry.audit.close()


async def start_server(config: ServerConfig, backend: Backend) -> RunningServer:
    """Load, warm up and check every bundle, then start serving; health turns SERVING last.

    A bundle the server may not serve (missing, altered, unsigned, failed gate) stops it from
    starting. A bundle this device cannot run (its backend, engine or self-test fails) does
    not: it is logged, listed by ListModels with the reason, and reported NOT_SERVING by the
    health service, while the other models serve.
    """
    web_host = config.telemetry.http_host if config.telemetry.http_port is not None else None
    security = open_security(
        config.security, host=config.host, web_host=web_host, allow_failed_validation=config.allow_failed_validation
    )
    registry = ModelRegistry(
        backend,
        config.models,
        fallback=config.fallback,
        policy=security.policy,
        run_self_test=config.self_test,
        audit=open_trail(config.audit_log, config.audit_syslog),
        monitoring=config.monitoring,
    )
    # Carries the caller of each call into the frame threads (shared memory belongs to its registrant).
    frames = CallerExecutor(max_workers=config.frame_threads, thread_name_prefix="edgescope-frame")
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgescope-loader")
    telemetry = TelemetryHub(config.telemetry, security.web)
    if registry.audit is not None:
        registry.audit.append("server_started", by="server", version=__version__)
        if registry.audit.forward is not None:
            telemetry.metrics.watch_audit_forwarding(registry.audit.forward)
    registry.on_change(lambda: telemetry.metrics.set_models(registry.names()))
    registry.on_change(lambda: telemetry.metrics.set_self_tests({m.name: m.self_test for m in registry.all()}))
    registry.on_degraded = telemetry.metrics.set_degraded
    loop = asyncio.get_running_loop()
    for bundle in config.bundles:
        try:
            model = await loop.run_in_executor(loader, registry.load, Path(bundle))
        except (BundleError, ConfigError) as exc:
            # The bundle named is not one this server may serve (missing, altered, unsigned, failed gate):
            # a configuration error, reported by refusing to start.
            _abandon(frames, loader, registry, telemetry, exc)
            raise
        except EdgescopeError as exc:
            # This device cannot run it (a backend, an engine, a self-test): serve the rest, say why.
            logger.error("NOT serving %s: %s", bundle, exc)
            continue
        except BaseException as exc:
            _abandon(frames, loader, registry, telemetry, exc)
            raise
        logger.info(
            "loaded %s %s (%s, %d instance(s), sha256 %s)",
            model.name,
            model.manifest.version,
            backend.name,
            model.worker.instances,
            model.provenance.sha256[:12],
        )
    # The first client's first frames would otherwise pay for the frame path's first runs.
    for model in registry.all():
        await warm_up(model)
    # Telemetry previews caption frames: without this the first stream's first frames pay for the fonts.
    load_fonts()
    # What startup made (modules, descriptors, sessions) lives as long as the server: kept out of the
    # collector's full passes, which otherwise stall frames for tens of milliseconds. Garbage first.
    gc.collect()
    gc.freeze()
    server = grpc.aio.server(options=server_options(config), interceptors=[security.interceptor])
    service = StreamService(registry, loader, config.scheduling, telemetry.metrics, repository=security.repository)
    # grpc_health's type stubs predate its asyncio servicer.
    health_servicer: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
    # Its default for the server is SERVING: not until the board has published what is loaded.
    for health_name in ("", SERVICE_NAME):
        await health_servicer.set(health_name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Each capture reports on its own health service, edgescope.capture.<name>.
    archive = CaptureArchive(config.capture_results, registry) if config.capture_results is not None else None
    captures = (
        CaptureHub(
            list(config.captures),
            service.run_capture,
            telemetry.metrics,
            grpc_health_setter(health_servicer),
            archive=archive,
        )
        if config.captures
        else None
    )
    service.attach_captures(captures)
    stream_pb2_grpc.add_StreamServiceServicer_to_server(service, server)
    add_kserve_service(
        registry,
        (frames, loader),
        service.streams,
        server,
        KServeSettings(
            max_batch=config.models.max_batch,
            batch_delay_us=round(config.models.batch_delay_s * 1e6),
            repository=security.repository,
        ),
        config.kserve_limits,
        service.admission,
    )
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(TelemetryServicer(telemetry.metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        server,
        (
            SERVICE,
            KSERVE_SERVICE,
            TELEMETRY_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"],
        ),
    )
    try:
        port = security.bind(server, f"{config.host}:{config.port}")
        if port == 0:
            raise OSError(f"cannot bind {config.host}:{config.port}")
        await server.start()
    except BaseException as exc:
        # Nothing serves yet: close every worker and session the start made.
        _abandon(frames, loader, registry, telemetry, exc)
        raise
    board = HealthBoard(health_servicer, registry, loop)
    registry.on_change(board.refresh)
    if captures is not None:
        captures.start()
    return RunningServer(server, port, registry, (frames, loader), health_servicer, service, captures, telemetry)


async def serve(config: ServerConfig, backend: Backend) -> None:
    """Run until SIGINT or SIGTERM, then stop with the configured grace period."""
    running = await start_server(config, backend)
    logger.info("edgescope serving %d model(s) on %s:%d", len(running.registry.all()), config.host, running.port)
    if config.port_file is not None:
        # Written whole and renamed, so a reader never sees a partial number.
        partial = config.port_file.with_name(config.port_file.name + ".partial")
        partial.write_text(f"{running.port}\n", encoding="utf-8")
        partial.replace(config.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stopping (grace %.1f s)", config.grace_s)
    await running.stop(config.grace_s)
