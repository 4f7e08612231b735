"""The Telemetry gRPC call: a snapshot now, then one every interval until the caller leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from edgescope.runtime.telemetry.metrics import RuntimeMetrics
from edgescope.v1 import telemetry_pb2, telemetry_pb2_grpc

# A floor on the interval, so a careless caller cannot turn snapshots into a busy loop.
MIN_INTERVAL_S = 0.05
TELEMETRY_SERVICE = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"]


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
