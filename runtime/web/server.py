"""The runtime's HTTP side: the live page, its JSON snapshot and preview, and Prometheus ``/metrics``.

Routes: ``/`` the page, ``/metrics`` Prometheus text, ``/api/snapshot`` the
telemetry snapshot as JSON (protobuf's JSON mapping, field names as in
``telemetry.proto``), ``/api/preview.jpg?stream=ID`` the latest preview of
a stream with its overlay (a small JPEG that telemetry refreshes twice a second). Every GET route answers HEAD too.

Served by uvicorn (an asyncio server, one event loop on its own thread, so
HTTP never runs on the gRPC loop) with a Starlette app. Chosen over aiohttp
because Starlette already has the Host allow-list (``TrustedHostMiddleware``)
and uvicorn the TLS options and a concurrency limit; only a cap on open
connections and a deadline for a new connection's first byte are added here.

Security, which the page needs because it shows patient frames:

- Host allow-list (``--allowed-hosts``; loopback names by default, plus the
  address it binds when that is a concrete one): a DNS-rebinding page, whose
  requests carry its own host name, gets 400.
- Headers: a Content-Security-Policy that loads nothing from elsewhere and
  forbids framing, ``X-Content-Type-Options: nosniff``, ``Referrer-Policy:
  no-referrer``, ``Cross-Origin-Resource-Policy: same-origin``, no caching.
- When the server has tokens, every route needs one: ``Authorization:
  Bearer TOKEN`` (Prometheus' ``bearer_token_file``) or HTTP Basic with the
  token as password (what a browser prompts for).
- TLS with the gRPC port's certificate, and client certificates when
  ``--tls-client-ca`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import uvicorn
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgescope.runtime.telemetry.metrics import RuntimeMetrics
from edgescope.runtime.transport import is_loopback

logger = logging.getLogger(__name__)

_PAGE = resources.files("edgescope.runtime.web").joinpath("index.html")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# A few operators' browsers and a scraper; more open connections than this are closed at once.
MAX_CONNECTIONS = 64
# A new connection must send its request within this many seconds (and an idle keep-alive one closes).
IDLE_TIMEOUT_S = 5
SECURITY_HEADERS = {
    # The page's own inline script and style only; nothing loaded from elsewhere; never framed.
    "content-security-policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",
}

# The role a token grants, or None when unknown (the server's token table).
TokenRole = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class WebSecurity:
    """Who may read the page; empty ``allowed_hosts`` means loopback names (and a concrete bind address)."""

    allowed_hosts: Sequence[str] = ()
    token_role: TokenRole | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None


class _SecurityHeaders:
    """Adds the security headers to every response, errors and refusals included."""

    def __init__(self, app: ASGIApp, tls: bool) -> None:
        self._app = app
        self._headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
        if tls:
            self._headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self._headers]
            await send(message)

        await self._app(scope, receive, with_headers)


class _TokenRequired:
    """Refuses a request without a valid token (Bearer, or Basic with the token as password)."""

    def __init__(self, app: ASGIApp, token_role: TokenRole) -> None:
        self._app = app
        self._token_role = token_role

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._token_role(_token(Request(scope)) or "") is None:
            refusal = PlainTextResponse(
                "a token is needed: Authorization: Bearer TOKEN, or the token as the password\n",
                status_code=401,
                headers={"www-authenticate": 'Basic realm="edgescope", charset="UTF-8"'},
            )
            await refusal(scope, receive, send)
            return
        await self._app(scope, receive, send)


def _token(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


class _LowercaseHost:
    """Host names are case-insensitive (RFC 9110); older Starlette compares them case by case."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = [(name, value.lower() if name == b"host" else value) for name, value in scope["headers"]]
            scope = {**scope, "headers": headers}
        await self._app(scope, receive, send)


def build_app(metrics: RuntimeMetrics, allowed_hosts: Sequence[str], security: WebSecurity) -> Starlette:
    async def page(request: Request) -> Response:
        return Response(_PAGE.read_bytes(), media_type="text/html; charset=utf-8")

    async def prometheus(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, metrics.registry)
        return Response(body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def snapshot(request: Request) -> Response:
        message = await run_in_threadpool(metrics.snapshot)
        body = json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        return Response(json.dumps(body), media_type="application/json")

    async def preview(request: Request) -> Response:
        image = metrics.preview(request.query_params.get("stream", ""))
        if image is None:
            return PlainTextResponse("no frame yet\n", status_code=404)
        return Response(image, media_type="image/jpeg")

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/index.html", page, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/api/snapshot", snapshot, methods=["GET"]),
        Route("/api/preview.jpg", preview, methods=["GET"]),
    ]
    # Outermost first: headers on every answer, then the Host check, then the token.
    middleware = [
        Middleware(_SecurityHeaders, tls=security.tls_cert is not None),
        Middleware(_LowercaseHost),
        Middleware(TrustedHostMiddleware, allowed_hosts=[h.lower() for h in allowed_hosts], www_redirect=False),
    ]
    if security.token_role is not None:
        middleware.append(Middleware(_TokenRequired, token_role=security.token_role))
    return Starlette(routes=routes, middleware=middleware)


class _BoundedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing connections past ``MAX_CONNECTIONS`` and silent new ones."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(cast(asyncio.Transport, transport))
        if len(self.connections) > MAX_CONNECTIONS:
            self.transport.close()
            return
        # uvicorn starts its idle timer only after a first response; start it now.
        self.timeout_keep_alive_task = self.loop.call_later(IDLE_TIMEOUT_S, self.timeout_keep_alive_handler)


def allowed_hosts_for(host: str, configured: Sequence[str]) -> list[str]:
    """The Host names to accept: configured ones, else loopback names; plus a concrete bind address."""
    hosts = list(configured) or list(LOOPBACK_HOSTS)
    bare = host.strip("[]")
    if bare and bare not in ("0.0.0.0", "::") and not is_loopback(bare):
        hosts.append(f"[{bare}]" if ":" in bare else bare)  # a Host header writes IPv6 in brackets
    return hosts


def _ssl_options(security: WebSecurity) -> dict[str, Any]:
    if security.tls_cert is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(security.tls_cert), "ssl_keyfile": str(security.tls_key)}
    if security.tls_client_ca is not None:
        options |= {"ssl_ca_certs": str(security.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


class WebServer:
    """Serves on ``host:port`` (0 picks a free port, see ``port``) from its own thread and event loop."""

    def __init__(self, metrics: RuntimeMetrics, host: str, port: int, security: WebSecurity | None = None) -> None:
        security = security or WebSecurity()
        app = build_app(metrics, allowed_hosts_for(host, security.allowed_hosts), security)
        # Bound here, so a taken port fails now (the caller logs it) rather than in the thread.
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._socket = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            app,
            http=_BoundedProtocol,
            ws="none",
            lifespan="off",
            loop="asyncio",
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=IDLE_TIMEOUT_S,
            timeout_graceful_shutdown=2,
            **_ssl_options(security),
        )
        self._server = uvicorn.Server(config)
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgescope-http", daemon=True)
        self._thread.start()
        self._started.wait(timeout=10)
        if not self._server.started:  # e.g. a TLS key ssl cannot load; the caller logs it
            self.close()
            raise OSError(f"the web page did not start on {host}:{self.port}")

    def _run(self) -> None:
        async def serve() -> None:
            task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
            while not self._server.started and not task.done():
                await asyncio.sleep(0.01)
            self._started.set()
            await task

        try:
            asyncio.run(serve())
        finally:
            self._started.set()

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._socket.close()
