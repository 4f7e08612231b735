"""Everything telemetry the server starts and stops: metrics, device sampler, web page."""

from __future__ import annotations

import logging

from edgescope.runtime.telemetry.device import DeviceSampler
from edgescope.runtime.telemetry.metrics import RuntimeMetrics, TelemetryConfig
from edgescope.runtime.web.server import WebSecurity, WebServer

logger = logging.getLogger(__name__)


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
