"""The server's side of telemetry: what it starts and stops (metrics, device sampler, web page) and the
Telemetry gRPC call.

Telemetry lives in three places, split by what each may import: ``runtime/telemetry/`` measures
(device sampling, latency recorders, alerts, ``RuntimeMetrics``) and imports neither the server nor
the web page; ``runtime/web/`` serves it over HTTP (the page and ``/metrics``); this module wires both
into the server and answers the Telemetry call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from edgescope.runtime.telemetry.device import DeviceSampler
from edgescope.runtime.telemetry.metrics import RuntimeMetrics, TelemetryConfig
from edgescope.runtime.web.server import WebSecurity, WebServer
from edgescope.v1 import telemetry_pb2, telemetry_pb2_grpc

logger = logging.getLogger(__name__)

# A floor on the interval, so a careless caller cannot turn snapshots into a busy loop.
MIN_INTERVAL_S = 0.05
TELEMETRY_SERVICE = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"]


class TelemetryHub:
    """Starts device sampling at once and the web page when ``config.http_port`` is set."""

    def __init__(self, config: TelemetryConfig, web_security: WebSecurity | None = None) -> None:
        self.metrics = RuntimeMetrics(config)
        self.sampler = DeviceSampler(config.interval_s, self.metrics.observe_device)
        logger.info("GPU telemetry: %s", self.sampler.gpu_status)
        self.sampler.start()
        self.web: WebServer | None = None
        if config.http_port is not None:
            try:
                self.web = WebServer(self.metrics, config.http_host, config.http_port, web_security)
            except OSError as exc:
                # Frames must keep flowing when a monitoring port is taken; the gRPC Telemetry call still works.
                logger.error(
                    "telemetry page and /metrics NOT served: cannot bind %s:%d (%s)",
                    config.http_host,
                    config.http_port,
                    exc,
                )
            else:
                logger.info("telemetry page and /metrics on http://%s:%d/", config.http_host, self.web.port)

    @property
    def http_port(self) -> int | None:
        return self.web.port if self.web is not None else None

    def close(self) -> None:
        if self.web is not None:
            self.web.close()
        self.sampler.close()


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, metrics: RuntimeMetrics) -> None:
        self._metrics = metrics

    async def Telemetry(
        self,
        request: telemetry_pb2.TelemetryRequest,
        context: grpc.aio.ServicerContext[telemetry_pb2.TelemetryRequest, telemetry_pb2.TelemetrySnapshot],
    ) -> AsyncIterator[telemetry_pb2.TelemetrySnapshot]:
        if request.interval_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "interval_s must not be negative")
        interval = max(MIN_INTERVAL_S, request.interval_s or self._metrics.config.interval_s)
        while True:
            # Snapshots read percentiles from every histogram: off the event loop.
            yield await asyncio.to_thread(self._metrics.snapshot)
            await asyncio.sleep(interval)
