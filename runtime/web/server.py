"""The runtime's HTTP side: the live page, its JSON snapshot and preview, and Prometheus ``/metrics``.

The standard library's threading HTTP server is enough for a handful of
operators' browsers and a scraper, and keeps it off the gRPC event loop.
It binds loopback by default; exposing it to a hospital network is an
explicit choice (``--metrics-host``).

Routes: ``/`` the page, ``/metrics`` Prometheus text, ``/api/snapshot``
the telemetry snapshot as JSON (protobuf's JSON mapping, field names as in
``telemetry.proto``), ``/api/preview.jpg?stream=ID`` the latest preview of a
stream with its overlay (a small JPEG that telemetry refreshes twice a second).
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgescope.runtime.telemetry.metrics import RuntimeMetrics

logger = logging.getLogger(__name__)

_PAGE = resources.files("edgescope.runtime.web").joinpath("index.html")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        metrics = self.server.metrics
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", _PAGE.read_bytes())
        elif url.path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
        elif url.path == "/api/snapshot":
            body = json_format.MessageToDict(
                metrics.snapshot(), preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            self._send(HTTPStatus.OK, "application/json", json.dumps(body).encode())
        elif url.path == "/api/preview.jpg":
            stream = parse_qs(url.query).get("stream", [""])[0]
            image = metrics.preview(stream)
            if image is None:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no frame yet\n")
                return
            self._send(HTTPStatus.OK, "image/jpeg", image)
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: RuntimeMetrics) -> None:
        self.metrics = metrics
        super().__init__(address, _Handler)


class WebServer:
    """Serves on ``host:port`` (0 picks a free port, see ``port``) from a daemon thread."""

    def __init__(self, metrics: RuntimeMetrics, host: str, port: int) -> None:
        self._server = _Server((host, port), metrics)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgescope-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
