"""The HTTP page's defences: Host allow-list, headers, tokens, TLS, HEAD, bounded connections."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgescope.runtime.server.auth import TokenTable
from edgescope.runtime.telemetry.metrics import RuntimeMetrics
from edgescope.runtime.web.server import IDLE_TIMEOUT_S, MAX_CONNECTIONS, WebSecurity, WebServer, allowed_hosts_for

from .certs import CertificateAuthority

ROUTES = ("/", "/index.html", "/metrics", "/api/snapshot", "/api/preview.jpg")
TOKEN = "web-read-token-0123456789"


@pytest.fixture
def web() -> Iterator[WebServer]:
    server = WebServer(RuntimeMetrics(), "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.close()


def _get(port: int, path: str, *, host: str | None = None, method: str = "GET", headers: dict[str, str] | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    if context is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        all_headers = {"Host": f"127.0.0.1:{port}" if host is None else host, **(headers or {})}
        connection.request(method, path, headers=all_headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8732", "127.0.0.1.nip.io", "", "attacker:80@127.0.0.1"])
def test_foreign_host_names_are_refused(web: WebServer, host: str) -> None:
    status, headers, _ = _get(web.port, "/api/snapshot", host=host)
    assert status == 400
    assert headers["x-content-type-options"] == "nosniff"  # refusals carry the headers too


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]:8732", "LOCALHOST:1"])
def test_loopback_host_names_are_served(web: WebServer, host: str) -> None:
    status, _, body = _get(web.port, "/api/snapshot", host=host)
    assert status == 200 and body.startswith(b"{")


def test_configured_and_bound_host_names() -> None:
    assert allowed_hosts_for("0.0.0.0", ()) == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts_for("10.1.2.3", ()) == ["localhost", "127.0.0.1", "[::1]", "10.1.2.3"]
    assert allowed_hosts_for("fd00::7", ()) == ["localhost", "127.0.0.1", "[::1]", "[fd00::7]"]
    assert allowed_hosts_for("127.0.0.1", ("edgescope.ward4",)) == ["edgescope.ward4"]


def test_every_route_answers_head_with_the_security_headers(web: WebServer) -> None:
    for route in ROUTES:
        get_status, _, _ = _get(web.port, route)
        status, headers, body = _get(web.port, route, method="HEAD")
        assert status == get_status and body == b"", route
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-frame-options"] == "DENY"
        assert headers["cross-origin-resource-policy"] == "same-origin"
        assert headers["cache-control"] == "no-store"
    assert _get(web.port, "/metrics", method="POST")[0] == 405


def test_tokens_guard_every_route(tmp_path: Path) -> None:
    table = TokenTable([("read", TOKEN)])
    server = WebServer(RuntimeMetrics(), "127.0.0.1", 0, WebSecurity(token_role=table.role_of))
    try:
        for route in ROUTES:
            status, headers, _ = _get(server.port, route)
            assert status == 401 and headers["www-authenticate"].startswith("Basic"), route
        basic = base64.b64encode(f"operator:{TOKEN}".encode()).decode()
        assert _get(server.port, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert _get(server.port, "/", headers={"Authorization": f"Basic {basic}"})[0] == 200
        assert _get(server.port, "/", headers={"Authorization": f"Bearer {TOKEN}x"})[0] == 401
        assert _get(server.port, "/", headers={"Authorization": "Basic !!!"})[0] == 401
    finally:
        server.close()


def test_page_over_tls_with_client_certificates(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    server_cert = ca.issue("page", server=True)
    client_cert = ca.issue("browser", server=False)
    security = WebSecurity(tls_cert=server_cert.cert, tls_key=server_cert.key, tls_client_ca=ca.path)
    server = WebServer(RuntimeMetrics(), "127.0.0.1", 0, security)
    try:
        context = ssl.create_default_context(cafile=str(ca.path))
        context.load_cert_chain(str(client_cert.cert), str(client_cert.key))
        status, headers, _ = _get(server.port, "/api/snapshot", context=context)
        assert status == 200 and headers["strict-transport-security"].startswith("max-age=")
        anonymous = ssl.create_default_context(cafile=str(ca.path))
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            _get(server.port, "/api/snapshot", context=anonymous)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            _get(server.port, "/api/snapshot")  # plain text to a TLS port
    finally:
        server.close()


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_connections_are_capped_and_silent_ones_closed(web: WebServer) -> None:
    """A crowd of idle sockets neither takes a thread each nor keeps the page away for long."""
    crowd = [socket.create_connection(("127.0.0.1", web.port), timeout=10) for _ in range(MAX_CONNECTIONS + 16)]
    try:
        time.sleep(0.5)
        closed_at_once = sum(_closed_by_server(s, 0.2) for s in crowd)
        assert closed_at_once >= 16
        started = time.monotonic()
        assert all(_closed_by_server(s, IDLE_TIMEOUT_S + 10) for s in crowd)
        assert time.monotonic() - started < IDLE_TIMEOUT_S + 10
    finally:
        for sock in crowd:
            sock.close()
    assert _get(web.port, "/api/snapshot")[0] == 200
