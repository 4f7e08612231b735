"""A TLS front on loopback for a plain-text TCP service: mutual TLS outside, the bytes relayed as they are.

It stands in front of a local Orthanc's HTTP port so that STOW-RS over HTTPS reaches a real archive
(Orthanc's own HTTPS is not usable in Debian's build).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

from .loopback_server import LoopbackServer, mutual_tls

IDLE_S = 30.0


class TlsFront(LoopbackServer):
    def __init__(self, backend_port: int, cert: Path, key: Path, client_ca: Path) -> None:
        self.backend_port = backend_port
        self.context = mutual_tls(cert, key, client_ca)
        self.handshake_failures = 0
        super().__init__()

    def handle(self, raw: socket.socket) -> None:
        raw.settimeout(IDLE_S)
        try:
            outside = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_failures += 1
            raw.close()
            return
        inside = socket.create_connection(("127.0.0.1", self.backend_port), timeout=IDLE_S)
        back = threading.Thread(target=_pump, args=(inside, outside), daemon=True)
        back.start()
        _pump(outside, inside)
        back.join(IDLE_S)
        outside.close()
        inside.close()

    def close(self) -> None:
        super().close(IDLE_S)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    # Either side ending ends the exchange; shutting both down wakes the other direction's recv.
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
