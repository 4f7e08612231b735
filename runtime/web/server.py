"""The runtime's HTTP side: the live page, its JSON snapshot and preview, and Prometheus ``/metrics``.

The standard library's threading HTTP server is enough for a handful of
operators' browsers and a scraper, and keeps it off the gRPC event loop.
It binds loopback by default; exposing it to a hospital network is an
explicit choice (``--metrics-host``).

Routes: ``/`` the page, ``/metrics`` Prometheus text, ``/api/snapshot``
the telemetry snapshot as JSON (protobuf's JSON mapping, field names as in
``telemetry.proto``), ``/api/preview.jpg?stream=ID`` the latest frame of a
stream with its overlay, drawn only when asked for.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import cast
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgescope.errors import EdgescopeError
from edgescope.runtime.pipeline.decode import decode_frame
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.render.overlay import draw_overlay
from edgescope.runtime.sources.display import to_display_rgb8
from edgescope.runtime.telemetry.metrics import RuntimeMetrics
from edgescope.v1 import stream_pb2

logger = logging.getLogger(__name__)

_PAGE = resources.files("edgescope.runtime.web").joinpath("index.html")


def render_preview(frame: stream_pb2.Frame, result: stream_pb2.Result) -> bytes:
    """JPEG of the frame with the result's mask and a caption."""
    mask = None
    for output in result.outputs:
        if output.WhichOneof("value") == "mask":
            mask = decode_mask(output.mask)
    caption = [f"{result.stream_id} seq {result.seq} {result.provenance.model}"]
    caption += [a.message for a in result.alerts]
    pixels = decode_frame(frame)
    display: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]
    if pixels.dtype == np.float32:
        # Float frames have no fixed display range: stretch what is there.
        low, span = float(pixels.min()), float(pixels.max() - pixels.min()) or 1.0
        display = ((pixels - low) * (255.0 / span)).astype(np.uint8)
    else:
        display = cast("npt.NDArray[np.uint8] | npt.NDArray[np.uint16]", pixels)
    rgb = draw_overlay(to_display_rgb8(display), mask, caption)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise EdgescopeError("JPEG encoding of the preview failed")
    return jpeg.tobytes()


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
            latest = metrics.preview(stream)
            if latest is None:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no frame yet\n")
                return
            try:
                image = render_preview(*latest)
            except EdgescopeError as exc:
                self._send(HTTPStatus.UNPROCESSABLE_ENTITY, "text/plain", f"{exc}\n".encode())
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
