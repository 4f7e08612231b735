"""The grpc.aio server: stream service, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgescope.runtime.backends.base import Backend
from edgescope.runtime.server.capture import CaptureConfig, CaptureHub, grpc_health_setter
from edgescope.runtime.server.kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from edgescope.runtime.server.kserve import add_kserve_service
from edgescope.runtime.server.registry import ModelRegistry
from edgescope.runtime.server.service import StreamService
from edgescope.runtime.server.shm import REGIONS
from edgescope.runtime.server.streams import SchedulerConfig
from edgescope.runtime.server.telemetry import TelemetryHub
from edgescope.runtime.server.telemetry_service import TELEMETRY_SERVICE_NAME, TelemetryServicer
from edgescope.runtime.telemetry.metrics import TelemetryConfig
from edgescope.runtime.transport import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from edgescope.v1 import stream_pb2, stream_pb2_grpc, telemetry_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = stream_pb2.DESCRIPTOR.services_by_name["StreamService"].full_name


@dataclass(slots=True)
class ServerConfig:
    bundles: Sequence[Path]
    host: str = "127.0.0.1"
    port: int = 8731
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = field(default_factory=lambda: max(2, os.cpu_count() or 1))
    grace_s: float = 5.0
    allow_failed_validation: bool = False
    # Written with the bound port once serving, so callers can use port 0.
    port_file: Path | None = None
    scheduling: SchedulerConfig = field(default_factory=SchedulerConfig)
    captures: Sequence[CaptureConfig] = ()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


class RunningServer:
    """A started server; ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        registry: ModelRegistry,
        executor: ThreadPoolExecutor,
        health_servicer: Any,
        service: StreamService,
        captures: CaptureHub | None,
        telemetry: TelemetryHub | None = None,
    ) -> None:
        self.server = server
        self.telemetry = telemetry
        self.port = port
        self.registry = registry
        self.service = service
        self._executor = executor
        self._health = health_servicer
        self._captures = captures

    async def stop(self, grace_s: float) -> None:
        """Drain: refuse new streams, answer every frame already received, then stop."""
        await self._health.enter_graceful_shutdown()
        if self._captures is not None:
            await self._captures.stop()
        drained = await self.service.drain(grace_s)
        if not drained:
            logger.warning("streams still open after %.1f s of draining; closing them", grace_s)
        await self.server.stop(grace_s)
        await self.service.close()
        self._executor.shutdown(wait=True)
        self.registry.close()
        REGIONS.close()
        if self.telemetry is not None:
            self.telemetry.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(config: ServerConfig, backend: Backend) -> RunningServer:
    """Load and warm up every bundle, then start serving; health turns SERVING last."""
    registry = ModelRegistry()
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="edgescope-frame")
    try:
        for bundle in config.bundles:
            model = registry.load(Path(bundle), backend, allow_failed_validation=config.allow_failed_validation)
            logger.info(
                "loaded %s %s (%s, sha256 %s)",
                model.name,
                model.manifest.version,
                backend.name,
                model.provenance.sha256[:12],
            )
    except BaseException:
        executor.shutdown(wait=False)
        registry.close()
        raise
    server = grpc.aio.server(options=channel_options(config.max_message_bytes))
    telemetry = TelemetryHub(config.telemetry)
    service = StreamService(registry, executor, backend, config.scheduling, telemetry.metrics)
    # grpc_health's type stubs predate its asyncio servicer.
    health_servicer: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
    # Each capture reports on its own health service, edgescope.capture.<name>.
    health_setter = grpc_health_setter(health_servicer)
    captures = (
        CaptureHub(list(config.captures), service.scheduler, telemetry.metrics, health_setter)
        if config.captures
        else None
    )
    service.attach_captures(captures)
    stream_pb2_grpc.add_StreamServiceServicer_to_server(service, server)
    add_kserve_service(registry, executor, server)
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(TelemetryServicer(telemetry.metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            KSERVE_SERVICE_NAME,
            TELEMETRY_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    await server.start()
    for health_name in ("", SERVICE_NAME):
        await health_servicer.set(health_name, health_pb2.HealthCheckResponse.SERVING)
    if captures is not None:
        captures.start()
    return RunningServer(server, port, registry, executor, health_servicer, service, captures, telemetry)


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
